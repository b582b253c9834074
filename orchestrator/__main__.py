"""python -m orchestrator: serve the public Generate API."""

import asyncio
import logging
import sys

from orchestrator.server import OrchestratorConfig, start
from specdec.config import parse
from specdec.errors import SpecdecError
from specdec.rpc.server import wait_for_signal

DESCRIPTION = (
    "The orchestrator of specdec, the only service applications call: tokenizes, runs speculative "
    "decoding across the draft and target services (exact rejection sampling), streams text."
)


async def main(config: OrchestratorConfig) -> int:
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        running = await start(config)
    except SpecdecError as error:
        logging.getLogger("orchestrator").error("cannot start: %s: %s", error.code_name, error.message)
        return 2
    await wait_for_signal()
    await running.stop(config.grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(OrchestratorConfig, "python -m orchestrator", "SPECDEC_ORCHESTRATOR", DESCRIPTION))))
