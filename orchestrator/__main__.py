"""python -m orchestrator: serve the public Generate API."""

import asyncio
import logging
import sys

from orchestrator.server import OrchestratorConfig, start
from specdec.config import parse
from specdec.errors import SpecdecError
from specdec.rpc.server import stop_requested, unless_stopped

DESCRIPTION = (
    "The orchestrator of specdec, the only service applications call: tokenizes, runs speculative "
    "decoding across the draft and target services (exact rejection sampling), streams text."
)


async def main(config: OrchestratorConfig) -> int:
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop = stop_requested()
    try:
        running = await unless_stopped(start(config), stop)
    except SpecdecError as error:
        logging.getLogger("orchestrator").error("cannot start: %s: %s", error.code_name, error.message)
        return 2
    if running is None:  # stopped while waiting for the model services
        return 0
    await stop.wait()
    await running.stop(config.grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(OrchestratorConfig, "python -m orchestrator", "SPECDEC_ORCHESTRATOR", DESCRIPTION))))
