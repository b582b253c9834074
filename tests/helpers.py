"""Test models and in-process service stacks.

Tiny random Llama models (hidden 32, 2 layers) built with from_config stand in for the target and
draft in fast tests; their initializer range is large so that distributions are peaked and greedy
ties (which would make equality tests flaky) do not happen.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draft_service import server as draft_server
from draft_service.drafters.model import ModelDrafter
from draft_service.drafters.ngram import NGramDrafter
from orchestrator import server as orchestrator_server
from specdec.models import LoadedModel
from target_service import server as target_server


def tiny_lm(
    seed: int, vocab_size: int, tokenizer=None, max_context: int = 512, eos: tuple[int, ...] = (2,), name: str | None = None, init: float = 0.5
) -> LoadedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_context,
        initializer_range=init,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name or f"tiny-{seed}",
        device=torch.device("cpu"),
        dtype=torch.float32,
        eos_token_ids=eos,
        max_context=max_context,
    )


def with_eos(loaded: LoadedModel, eos: tuple[int, ...]) -> LoadedModel:
    return replace(loaded, eos_token_ids=eos)


class LoopThread:
    """An asyncio event loop in a background thread, so synchronous tests can host grpc.aio servers."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Stack:
    """Target, draft and orchestrator servers on loopback ports, in one background loop."""

    loop: LoopThread
    target: object
    draft: object | None
    orchestrator: object

    def address(self, which: str) -> str:
        return f"127.0.0.1:{getattr(self, which).port}"

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
    **orchestrator_options,
) -> Stack:
    """Serve `target` and `drafter` (a Drafter, or None for target-only) on port 0, plus an
    orchestrator using the target's tokenizer. `model_service_options`: settings (ServerConfig
    fields) of both model services."""
    model_service_options = model_service_options or {}
    loop = LoopThread()

    async def start_all():
        started = []
        try:
            target_running = await target_server.start(target_server.TargetConfig(port=0, **model_service_options), loaded=target)
            started.append(target_running)
            draft_running = None
            if drafter is not None:
                draft_running = await draft_server.start(
                    draft_server.DraftConfig(port=0, **model_service_options),
                    drafter=drafter,
                    max_context=draft_context or target.max_context,
                )
                started.append(draft_running)
            config = orchestrator_server.OrchestratorConfig(
                port=0,
                target=f"127.0.0.1:{target_running.port}",
                draft=f"127.0.0.1:{draft_running.port}" if draft_running else "",
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


def model_drafter(loaded: LoadedModel, max_support: int = 64) -> ModelDrafter:
    return ModelDrafter(loaded, max_support)


def ngram_drafter() -> NGramDrafter:
    return NGramDrafter()


def in_process_generator(target: LoadedModel, drafter=None, **limits):
    """A Generator wired to engines in this process (no network), with fresh sessions."""
    from draft_service.engine import DraftEngine
    from orchestrator.backends import InProcessDraft, InProcessTarget
    from orchestrator.generation import GenerationLimits, Generator
    from target_service.engine import TargetEngine

    target_engine = TargetEngine(target)
    draft = InProcessDraft(DraftEngine(drafter, max_context=target.max_context)) if drafter is not None else None
    return Generator(target.tokenizer, InProcessTarget(target_engine), target_engine.info(), draft, GenerationLimits(**limits))


def run_generation(generator, request, deadline=None):
    """All events of one request, run to the end."""

    async def collect():
        return [event async for event in generator.stream(request, deadline)]

    return asyncio.run(collect())


def joined(events) -> tuple[list[int], str]:
    return [t for e in events for t in e.token_ids], "".join(e.text for e in events)


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA; a server certificate (127.0.0.1 and localhost) and a client certificate,
    both signed by it; and another CA that signed neither."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str


def openssl(*arguments: str) -> None:
    subprocess.run(["openssl", *arguments], check=True, capture_output=True, timeout=60)


# P-256 keys: made in milliseconds, where RSA keys take a noticeable part of a second each.
NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(directory: Path, name: str) -> tuple[str, str]:
    """A self-signed CA valid for a day: (certificate, key) paths."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl("req", "-x509", *NEW_KEY, "-days", "1", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert))
    return str(cert), str(key)


def make_leaf(directory: Path, name: str, ca: tuple[str, str], extensions: str) -> tuple[str, str]:
    """A certificate signed by `ca` with the given X.509v3 `extensions` (openssl extfile lines):
    (certificate, key) paths."""
    cert, key, request, extfile = (directory / f"{name}.{suffix}" for suffix in ("pem", "key", "csr", "ext"))
    extfile.write_text(extensions)
    openssl("req", "-new", *NEW_KEY, "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(request))
    openssl("x509", "-req", "-in", str(request), "-CA", ca[0], "-CAkey", ca[1], "-days", "1", "-extfile", str(extfile),
            "-out", str(cert))
    return str(cert), str(key)


def make_certificates(directory: Path) -> Certificates:
    """Certificates for TLS and mutual-TLS tests, made with the openssl command."""
    ca = make_ca(directory, "ca")
    # The server's certificate allows client authentication too, as the deployment's single one
    # does (docker/healthcheck.sh presents it to its own service under mutual TLS).
    server_extensions = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
    server = make_leaf(directory, "server", ca, server_extensions)
    client = make_leaf(directory, "client", ca, "extendedKeyUsage=clientAuth\n")
    return Certificates(ca[0], *server, *client, make_ca(directory, "other-ca")[0])
