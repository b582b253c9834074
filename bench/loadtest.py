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
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.stack import ROOT, ServiceStack

CONFIGS = ROOT / "bench" / "ghz"
PROTOSET = ROOT / "protos" / "specdec.protoset"


def ghz_binary() -> str:
    """$SPECDEC_GHZ (the pinned ghz `make tools` installs; make exports it), else ghz on PATH."""
    found = os.environ.get("SPECDEC_GHZ") or shutil.which("ghz")
    if not found or not Path(found).exists():
        raise FileNotFoundError("ghz is not installed: run `make tools` (go install of a pinned ghz)")
    return found


def run_ghz(config: Path, address: str, out: Path, overrides: dict | None = None) -> dict:
    """Run ghz with `config` against `address`, `overrides` being ghz flags (e.g. {"total": 10});
    return its JSON report (also written to `out`)."""
    command = [ghz_binary(), "--config", str(config), "--protoset", str(PROTOSET), "--format", "json", "--output", str(out)]
    for flag, value in (overrides or {}).items():
        if value is not None:
            command += [f"--{flag}", str(value)]
    subprocess.run(command + [address], check=True, cwd=config.parent)
    return json.loads(out.read_text())


def summary_line(report: dict) -> str:
    percentiles = {p["percentage"]: p["latency"] / 1e9 for p in report.get("latencyDistribution") or []}
    return (
        f"{report['name']}: {report['count']} requests, {report['rps']:.2f} requests/s, "
        f"p50 {percentiles.get(50, float('nan')):.2f} s, p99 {percentiles.get(99, float('nan')):.2f} s, "
        f"status {report.get('statusCodeDistribution')}"
    )


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
