"""A peer for the weight-format benchmark: llama.cpp's own `llama-bench` on the very GGUF file the
embedded target is made from, at the same thread count, when the user points us at a build
(`--llama-bench PATH`). A measuring aid, not a dependency: nothing else runs llama.cpp.

What it measures, to set beside our Verify curve and decode rate:
  - T(n): n tokens scored in one pass over a context of `depth` tokens (llama-bench -p n -d depth),
  - decode tokens/s: 64 greedy tokens one at a time (llama-bench -n 64, the usual "tg64").
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from specdec.models import embedded_gguf_path


def _run(binary: Path, gguf: Path, threads: int, extra: list[str]) -> list[dict]:
    command = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", "5", "-o", "json", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def measure(binary: Path, threads: int, sizes=(1, 2, 5, 9, 16), depth: int = 200, gguf: Path | None = None) -> dict:
    """{"verify_seconds": {n: s}, "decode_tokens_per_second": tg64, "build": ..., "gguf": path}."""
    gguf = gguf or embedded_gguf_path()
    curve = _run(binary, gguf, threads, ["-p", ",".join(map(str, sizes)), "-n", "0", "-d", str(depth)])
    decode = _run(binary, gguf, threads, ["-p", "0", "-n", "64"])
    seconds = {int(test["n_prompt"]): test["avg_ns"] / 1e9 for test in curve}
    return {
        "verify_seconds": {n: seconds[n] for n in sizes},
        "decode_tokens_per_second": decode[0]["avg_ts"],
        "build": f"{decode[0].get('build_commit', '?')} ({decode[0].get('build_number', '?')})",
        "cpu": decode[0].get("cpu_info", ""),
        "gguf": str(gguf),
        "threads": threads,
        "depth": depth,
    }
