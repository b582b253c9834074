"""Configuration and start-up of the draft service."""

from __future__ import annotations

from dataclasses import dataclass

from draft_service.drafters import early_exit
from draft_service.drafters.base import Drafter
from draft_service.drafters.feature import is_feature_drafter, load_feature_drafter, trained_on
from draft_service.drafters.model import ModelDrafter, draft_vocabulary_of
from draft_service.drafters.ngram import NGramDrafter
from draft_service.drafters.staged import StagedDrafter, parse_spec
from draft_service.engine import DraftEngine
from draft_service.servicer import DraftServicer
from specdec.config import ModelServiceConfig, option
from specdec.model_service.runtime import ModelWorker, RunningModelService, batching_config, session_limits, start_model_service
from specdec.models import load_causal_lm
from specdec.v1 import draft_pb2, draft_pb2_grpc

SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name
NGRAM = "ngram"


@dataclass
class DraftConfig(ModelServiceConfig):
    port: int = option(50052, "port to listen on; 0 picks a free one")
    model: str = option(
        NGRAM, "ngram, a draft model (directory, hub id, .gguf, embedded), a feature drafter, early-exit:L or staged:FIRST+SECOND"
    )
    feature_target: str = option(
        "", "feature drafters and early exits: the target they borrow layers, embedding and head from (default: their own)"
    )
    ngram_max: int = option(3, "n-gram drafting: longest n-gram to match")
    ngram_min: int = option(2, "n-gram drafting: shortest n-gram to match (2 beat 1 in bench/tune_ngram.py: single-token matches mostly miss)")
    max_support: int = option(64, "model drafting when sampling: tokens of the draft distribution sent per position (it stays exact)")
    max_context: int = option(8192, "n-gram drafting: longest sequence a session may hold (model drafters use the model's)")


def build_drafter(config: DraftConfig) -> tuple[Drafter, int]:
    """The drafter the configuration names, and the longest sequence it handles."""
    stages = parse_spec(config.model)
    if stages is not None:
        (first, _), (second, context) = (token_drafter(config, name) for name in stages)
        if not isinstance(second, ModelDrafter):
            raise ValueError(f"the second stage of {config.model!r} must be a draft model")
        return StagedDrafter(first, second), context
    if is_feature_drafter(config.model):
        target = load_causal_lm(config.feature_target or trained_on(config.model), config.device, "float32")
        return load_feature_drafter(config.model, target, config.max_support), target.max_context
    return token_drafter(config, config.model)


def token_drafter(config: DraftConfig, model: str) -> tuple[Drafter, int]:
    """n-gram lookup, an early exit or a draft model, and the longest sequence it handles."""
    if model == NGRAM:
        return NGramDrafter(config.ngram_max, config.ngram_min), config.max_context
    exit_directory = early_exit.directory_of(model)
    if exit_directory is not None:
        target_name = config.feature_target or early_exit.read_config(exit_directory).target
        target = load_causal_lm(target_name, config.device, "float32")
        loaded, vocabulary = early_exit.assemble(exit_directory, target, config.dtype)
        return ModelDrafter(loaded, config.max_support, vocabulary), loaded.max_context
    loaded = load_causal_lm(model, config.device, config.dtype)
    return ModelDrafter(loaded, config.max_support, draft_vocabulary_of(model)), loaded.max_context


async def start(config: DraftConfig, drafter: Drafter | None = None, max_context: int | None = None) -> RunningModelService:
    """Serve a drafter; `drafter` skips building it from `config` (tests pass tiny models)."""

    def load_engine() -> DraftEngine:
        built, context = (drafter, max_context or config.max_context) if drafter else build_drafter(config)
        built.warm_up()
        return DraftEngine(built, session_limits(config), config.max_speculative_tokens, context)

    servicer = DraftServicer(ModelWorker("draft-model"), batching_config(config))
    return await start_model_service(config, servicer, draft_pb2_grpc.add_DraftServiceServicer_to_server, SERVICE_NAME, load_engine)
