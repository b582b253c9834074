"""The three services in this process: real grpc.aio servers on loopback ports, served by one
background event loop (`start_stack`), or the orchestrator's generation engine wired straight to
the model engines, without the network (`in_process_engine`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from draft_service import server as draft_server
from harness.loop import LoopThread
from orchestrator import server as orchestrator_server
from specdec.models import LoadedModel
from target_service import server as target_server


@dataclass
class Stack:
    """Target, draft and orchestrator servers on loopback ports, in one background loop."""

    loop: LoopThread
    target: object
    draft: object | None
    orchestrator: object

    def address(self, which: str) -> str:
        """Of "target", "draft" or "orchestrator"; without a draft service, the draft API is the
        target's own (--self-draft)."""
        service = self.target if which == "draft" and self.draft is None else getattr(self, which)
        return f"127.0.0.1:{service.port}"

    def channel(self, which: str) -> grpc.Channel:
        return grpc.insecure_channel(self.address(which))

    def stop(self) -> None:
        async def stop_all():
            await self.orchestrator.stop()
            if self.draft is not None:
                await self.draft.stop()
            await self.target.stop()

        self.loop.run(stop_all())
        self.loop.close()


def start_stack(
    target: LoadedModel,
    drafter=None,
    draft_context: int | None = None,
    model_service_options: dict | None = None,
    draft_options: dict | None = None,
    self_draft: str = "",
    **orchestrator_options,
) -> Stack:
    """Serve `target` and `drafter` (a Drafter, or None for target-only) on port 0, plus an
    orchestrator using the target's tokenizer. `model_service_options`: settings (ServerConfig
    fields) of both model services; `draft_options`: of the draft service alone; `self_draft`:
    the target drafts for itself (--self-draft) and the orchestrator's draft is the target."""
    model_service_options = model_service_options or {}
    loop = LoopThread()

    async def start_all():
        started = []
        try:
            target_config = target_server.TargetConfig(port=0, self_draft=self_draft, **model_service_options)
            target_running = await target_server.start(target_config, loaded=target)
            started.append(target_running)
            draft_running = None
            if drafter is not None:
                draft_running = await draft_server.start(
                    draft_server.DraftConfig(port=0, **{**model_service_options, **(draft_options or {})}),
                    drafter=drafter,
                    max_context=draft_context or target.max_context,
                )
                started.append(draft_running)
            config = orchestrator_server.OrchestratorConfig(
                port=0,
                target=f"127.0.0.1:{target_running.port}",
                draft=f"127.0.0.1:{(draft_running or target_running).port}" if draft_running or self_draft else "",
                connect_timeout_s=60,
                **orchestrator_options,
            )
            orchestrator_running = await orchestrator_server.start(config, tokenizer=target.tokenizer)
        except BaseException:
            for running in started:
                await running.stop()
            raise
        return Stack(loop, target_running, draft_running, orchestrator_running)

    try:
        return loop.run(start_all())
    except BaseException:
        loop.close()
        raise


def in_process_engine(target: LoadedModel, drafter=None, self_draft: str = "", **settings):
    """A GenerationEngine wired to model engines in this process (no network), with fresh
    sessions; `self_draft`: the target drafts for itself (--self-draft), instead of `drafter`;
    `settings`: GenerationEngine's (k_settings, max_new_tokens, pipeline_drafts)."""
    from draft_service.engine import DraftEngine
    from orchestrator.backends import InProcessDraft, InProcessTarget
    from orchestrator.generation import GenerationEngine
    from target_service import self_draft as self_drafting
    from target_service.engine import TargetEngine

    drafting = self_drafting.SelfDraft(target.model, *self_drafting.parse(self_draft)) if self_draft else None
    target_engine = TargetEngine(target, self_draft=drafting)
    if drafting is not None:
        drafting.build_exit()
        drafter = self_drafting.SelfDrafter(target_engine)
    draft_engine = DraftEngine(drafter, max_context=target.max_context) if drafter is not None else None
    return GenerationEngine(
        target.tokenizer,
        InProcessTarget(target_engine),
        target_engine.info(),
        InProcessDraft(draft_engine) if draft_engine else None,
        draft_engine.info() if draft_engine else None,
        **settings,
    )


def run_generation(engine, request, deadline=None):
    """All events of one request, run to the end."""

    async def collect():
        return [event async for event in engine.stream(request, deadline)]

    return asyncio.run(collect())
