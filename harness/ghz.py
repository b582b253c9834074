"""Running ghz, an independent Go gRPC load tester, against an orchestrator with the shipped
configs in bench/ghz/ (unary Generate, server-streaming GenerateStream) and the protoset (ghz cannot
use reflection against Python servers): `make loadtest` and tests/test_ghz.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from harness.processes import ROOT

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
