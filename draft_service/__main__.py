"""python -m draft_service: serve a drafter over gRPC."""

import asyncio

from draft_service.server import DraftConfig, start
from specdec.config import parse
from specdec.model_service.runtime import run_model_service

DESCRIPTION = (
    "The draft service of specdec: proposes K draft tokens per round for each session, with a small "
    "causal LM (per-session KV cache, rollback) or prompt-lookup n-grams."
)

if __name__ == "__main__":
    asyncio.run(run_model_service(parse(DraftConfig, "python -m draft_service", "SPECDEC_DRAFT", DESCRIPTION), start))
