"""`make loadtest`: ghz against the orchestrator, unary `Generate` and server-streaming
`GenerateStream`, with the ready configs in bench/ghz/.

    python -m bench.loadtest [--draft smollm2-draft-l6] [--total 40] [--concurrency 4]

Starts the three services on loopback (or uses `--address` of a running orchestrator), runs ghz
with each config (the protoset carries every import, since ghz cannot use reflection against
Python servers), writes ghz's JSON reports to bench/results/ghz/ and prints requests per second,
latency percentiles and the status codes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from harness.ghz import CONFIGS, run_ghz, summary_line
from harness.processes import ROOT, ServiceStack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="a running orchestrator; by default the services are started here")
    parser.add_argument("--draft", default="ngram", help="draft service model when starting the services")
    parser.add_argument("--total", type=int, help="requests per config (default: the config's)")
    parser.add_argument("--concurrency", type=int, help="concurrent requests (default: the config's)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ghz")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        address = args.address or stack.enter_context(ServiceStack(draft_model=args.draft, log_dir=args.out / "logs")).address("orchestrator")
        failed = False
        for config in sorted(CONFIGS.glob("*.json")):
            report = run_ghz(config, address, args.out / f"{config.stem}.report.json", {"total": args.total, "concurrency": args.concurrency})
            print(summary_line(report))
            failed |= set(report.get("statusCodeDistribution") or {}) != {"OK"}
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
