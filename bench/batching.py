"""Two measurements behind the target's batching design, on the real target model in-process:

1. A batched verify forward (rows of 5 tokens, as K=4 rounds send, over ragged contexts) through
   the packed path (specdec/lean_llama.py: no padding, caches in place) and through transformers
   with left-padded copies of the caches (lm.forward_padded), by batch size.
2. Chunked prefill: while sessions run rounds through the target's scheduler, a long prompt
   arrives; the longest gap between two rounds of the running sessions, with the prompt prefilled
   whole and in chunks.

    python -m bench.batching                 # embedded target, CPU
    python -m bench.batching --device cuda

Writes bench/results/batching/batching.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch

from specdec import lm, sampling
from specdec.messages import VerifyWork
from specdec.model_service.batching import BatchingConfig
from specdec.model_service.runtime import ModelWorker
from specdec.models import load_causal_lm
from target_service.engine import TargetEngine
from target_service.servicer import TargetServicer

ROOT = Path(__file__).resolve().parent.parent


def ragged_caches(model, vocab: int, batch: int, context: int) -> list[lm.SequenceCache]:
    generator = torch.Generator().manual_seed(0)
    caches = []
    for row in range(batch):
        cache = lm.SequenceCache()
        lm.forward(model, [cache], [torch.randint(0, vocab, (context + 7 * row,), generator=generator).tolist()], logits_for_last=1)
        caches.append(cache)
    return caches


def time_forward(forward, model, caches, tokens_per_row: int, repeats: int) -> float:
    """Median seconds of one batched forward adding `tokens_per_row` to every cache (rolled back after)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        forward(model, caches, [[1] * tokens_per_row for _ in caches])
        times.append(time.perf_counter() - started)
        for cache in caches:
            cache.truncate(cache.length - tokens_per_row)
    return statistics.median(times)


def measure_paths(loaded, batches: list[int], context: int, repeats: int) -> list[dict]:
    rows = []
    for batch in batches:
        caches = ragged_caches(loaded.model, loaded.vocab_size, batch, context)
        packed = time_forward(lm.forward, loaded.model, caches, 5, repeats)
        padded = time_forward(lm.forward_padded, loaded.model, caches, 5, repeats)
        rows.append({"batch": batch, "tokens": 5 * batch, "packed_ms": 1000 * packed, "padded_ms": 1000 * padded})
        print(f"batch {batch:2d} ({5 * batch:3d} tokens): packed {1000 * packed:7.1f} ms, padded {1000 * padded:7.1f} ms", flush=True)
    return rows


async def round_gaps_during_prefill(loaded, sessions: int, prompt_tokens: int, chunk: int) -> dict:
    """Run `sessions` sessions' rounds (5 tokens each) through the target servicer's scheduler;
    after a few rounds start a `prompt_tokens` prefill; the gaps between consecutive rounds."""
    servicer = TargetServicer(ModelWorker("bench"), BatchingConfig(), prefill_chunk_tokens=chunk)
    servicer.engine = TargetEngine(loaded)
    for index in range(sessions):
        await servicer.start_session(f"s{index}", list(range(1, 200)))
    gaps: list[float] = []
    prefill_window = []

    async def rounds(session_id: str):
        length, last = 198, time.perf_counter()
        for _ in range(12):
            work = VerifyWork(session_id, length, [7], [7, 7, 7, 7], None, sampling.GREEDY, [])
            (verdict,), _ = await servicer.scheduler.submit([work])
            length += 1 + verdict.accepted
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def long_prompt():
        await asyncio.sleep(0.5)
        started = time.perf_counter()
        await servicer.start_session("long", [5] * prompt_tokens)
        prefill_window.append(time.perf_counter() - started)

    await asyncio.gather(long_prompt(), *(rounds(f"s{i}") for i in range(sessions)))
    await servicer.scheduler.close()
    servicer.worker.shutdown()
    return {"chunk": chunk, "max_gap_s": max(gaps), "median_gap_s": statistics.median(gaps), "prefill_s": prefill_window[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=1500, help="length of the long prompt of measurement 2")
    parser.add_argument("--chunks", default="0,256,128", help="prefill chunk sizes to compare (0: whole prompt)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "batching")
    args = parser.parse_args(argv)

    loaded = load_causal_lm(args.model, args.device, "float32")
    paths = measure_paths(loaded, [int(b) for b in args.batches.split(",")], args.context, args.repeats)
    prefill = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        result = asyncio.run(round_gaps_during_prefill(loaded, 4, args.prompt_tokens, chunk))
        prefill.append(result)
        print(
            f"prefill chunk {chunk or 'whole':>5}: longest gap between rounds {1000 * result['max_gap_s']:7.0f} ms "
            f"(median {1000 * result['median_gap_s']:.0f} ms), prefill {result['prefill_s']:.2f} s",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batching.json").write_text(
        json.dumps({"model": args.model, "device": args.device, "context": args.context, "paths": paths, "prefill": prefill}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
