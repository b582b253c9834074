"""Configuration and start-up of the target service."""

from __future__ import annotations

from dataclasses import dataclass

from specdec.config import ModelServiceConfig, option
from specdec.model_service.runtime import ModelWorker, RunningModelService, batching_config, session_limits, start_model_service
from specdec.models import LoadedModel, load_causal_lm
from specdec.v1 import target_pb2, target_pb2_grpc
from target_service.engine import TargetEngine
from target_service.servicer import TargetServicer

SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name


@dataclass
class TargetConfig(ModelServiceConfig):
    port: int = option(50051, "port to listen on; 0 picks a free one")
    prefill_chunk_tokens: int = option(
        256, "prompt tokens prefilled per step, other sessions' Verify batches running between steps; 0 = whole prompt at once"
    )


async def start(config: TargetConfig, loaded: LoadedModel | None = None) -> RunningModelService:
    """Serve the target; `loaded` skips loading `config.model` (tests pass tiny models)."""

    def load_engine() -> TargetEngine:
        model = loaded or load_causal_lm(config.model, config.device, config.dtype)
        engine = TargetEngine(model, session_limits(config), config.max_speculative_tokens)
        engine.warm_up()
        return engine

    servicer = TargetServicer(ModelWorker("target-model"), batching_config(config), config.prefill_chunk_tokens)
    return await start_model_service(config, servicer, target_pb2_grpc.add_TargetServiceServicer_to_server, SERVICE_NAME, load_engine)
