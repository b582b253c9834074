"""python -m target_service: serve the target model over gRPC."""

import asyncio

from specdec.config import parse
from specdec.model_service.runtime import run_model_service
from target_service.server import TargetConfig, start

DESCRIPTION = (
    "The target service of specdec: holds the large model and per-session KV caches, and verifies "
    "batches of draft tokens in one forward pass (rejection sampling with recovered and bonus tokens)."
)

if __name__ == "__main__":
    asyncio.run(run_model_service(parse(TargetConfig, "python -m target_service", "SPECDEC_TARGET", DESCRIPTION), start))
