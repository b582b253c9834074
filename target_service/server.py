"""Configuration and start-up of the target service (and, with --self-draft, of its own drafting)."""

from __future__ import annotations

from dataclasses import dataclass

from draft_service.engine import DraftEngine
from draft_service.servicer import DraftServicer
from specdec.config import ModelServiceConfig, option
from specdec.model_service.runtime import ModelWorker, RunningModelService, batching_config, session_limits, start_model_service
from specdec.models import LoadedModel, load_causal_lm
from specdec.v1 import draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc
from target_service import self_draft
from target_service.engine import TargetEngine
from target_service.servicer import TargetServicer

SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name
DRAFT_SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name


@dataclass
class TargetConfig(ModelServiceConfig):
    port: int = option(50051, "port to listen on; 0 picks a free one")
    prefill_chunk_tokens: int = option(
        256, "prompt tokens prefilled per step, other sessions' Verify batches running between steps; 0 = whole prompt at once"
    )
    self_draft: str = option(
        "", "also serve DraftService, drafting with the target's first layers: L, early-exit:L or an exit's directory; empty: off"
    )
    max_support: int = option(64, "--self-draft when sampling: tokens of the draft distribution sent per position (it stays exact)")


async def start(config: TargetConfig, loaded: LoadedModel | None = None) -> RunningModelService:
    """Serve the target; `loaded` skips loading `config.model` (tests pass tiny models)."""
    worker = ModelWorker("target-model")
    draft_servicer = DraftServicer(worker, batching_config(config)) if config.self_draft else None

    def load_engine() -> TargetEngine:
        model = loaded or load_causal_lm(config.model, config.device, config.dtype)
        drafting = None
        if config.self_draft:
            layers, exit_directory = self_draft.parse(config.self_draft)
            drafting = self_draft.SelfDraft(model.model, layers, exit_directory)
        engine = TargetEngine(model, session_limits(config), config.max_speculative_tokens, drafting)
        engine.warm_up()
        if draft_servicer is not None:
            drafter = self_draft.SelfDrafter(engine, config.max_support)
            drafter.warm_up()
            draft_servicer.engine = DraftEngine(drafter, session_limits(config), config.max_speculative_tokens, model.max_context)
        return engine

    def add_to_server(servicer, server) -> None:
        target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, server)
        if draft_servicer is not None:
            draft_pb2_grpc.add_DraftServiceServicer_to_server(draft_servicer, server)

    servicer = TargetServicer(worker, batching_config(config), config.prefill_chunk_tokens)
    companions = ((DRAFT_SERVICE_NAME, draft_servicer),) if draft_servicer else ()
    return await start_model_service(config, servicer, add_to_server, SERVICE_NAME, load_engine, companions)
