"""Throughput under concurrent load: the three services as separate processes, closed-loop clients
at each concurrency level, target-only (K=0), speculative with a fixed K and with adaptive K, on
the same prompts in one run, the modes interleaved per level.

    python -m bench.load                                   # levels 1,2,4,8,16; embedded target, l6 draft
    python -m bench.load --levels 1,8 --requests-per-client 1 --max-new-tokens 16   # a quick look

Per level and mode: aggregate tokens/s (all tokens over the level's wall time), p50/p99 time to
first token, per-request tokens/s (median, p10-p90), mean batch size seen by the target, mean K.
Writes records.jsonl (one line per request), summary.json, report.md and load.png under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import grpc

from bench.report import spread
from bench.specbench import default_prompts, load_prompts
from harness.processes import ServiceStack
from specdec.v1 import orchestrator_pb2, orchestrator_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
MODES = {"target-only": 0, "speculative K=4": 4, "speculative adaptive K": None}


async def one_request(stub, text: str, k: int | None, max_new_tokens: int) -> dict:
    request = orchestrator_pb2.GenerateRequest(
        messages=[orchestrator_pb2.ChatMessage(role="user", content=text)], max_new_tokens=max_new_tokens
    )
    if k is not None:
        request.num_speculative_tokens = k
    started = time.perf_counter()
    first, tokens, stats = None, 0, None
    async for message in stub.GenerateStream(request, timeout=1800):
        if message.token_ids and first is None:
            first = time.perf_counter() - started
        tokens += len(message.token_ids)
        if message.HasField("stats"):
            stats = message.stats
    seconds = time.perf_counter() - started
    return {
        "tokens": tokens,
        "seconds": seconds,
        "ttft_s": first if first is not None else seconds,
        "tokens_per_s": tokens / seconds,
        "rounds": stats.rounds,
        "draft_tokens": stats.draft_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "tokens_per_target_forward": stats.tokens_per_target_forward,
        "queue_seconds": stats.queue_seconds,
    }


async def run_level(address: str, prompts: list[str], concurrency: int, k: int | None, per_client: int, max_new_tokens: int) -> tuple[list[dict], float]:
    """`concurrency` clients, each sending `per_client` requests back to back (prompts taken in
    turn); the records and the level's wall time."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        queue = [prompts[i % len(prompts)] for i in range(concurrency * per_client)]
        records: list[dict] = []

        async def client():
            while queue:
                records.append(await one_request(stub, queue.pop(0), k, max_new_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return records, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize_level(records: list[dict], wall_s: float) -> dict:
    rounds = sum(r["rounds"] for r in records)
    return {
        "requests": len(records),
        "aggregate_tokens_per_s": sum(r["tokens"] for r in records) / wall_s,
        "ttft_p50_s": percentile([r["ttft_s"] for r in records], 0.5),
        "ttft_p99_s": percentile([r["ttft_s"] for r in records], 0.99),
        "per_request_tokens_per_s": spread([r["tokens_per_s"] for r in records]),
        "mean_k": sum(r["draft_tokens"] for r in records) / rounds if rounds else 0.0,
        "acceptance": sum(r["accepted_tokens"] for r in records) / max(1, sum(r["draft_tokens"] for r in records)),
        "tokens_per_target_forward": statistics.mean(r["tokens_per_target_forward"] for r in records),
        "queue_s_per_request": statistics.mean(r["queue_seconds"] for r in records),
        "wall_s": wall_s,
    }


def report_markdown(summary: dict, description: str) -> str:
    lines = [
        f"# Throughput under load\n\n{description}\n",
        "| concurrency | mode | aggregate tok/s | vs target-only | TTFT p50 / p99 (s) | per-request tok/s median (p10-p90) | mean K | tokens/forward |",
        "|---:|---|---:|---:|---|---|---:|---:|",
    ]
    for level, modes in summary["levels"].items():
        baseline = modes["target-only"]["aggregate_tokens_per_s"]
        for mode, s in modes.items():
            per = s["per_request_tokens_per_s"]
            lines.append(
                f"| {level} | {mode} | {s['aggregate_tokens_per_s']:.1f} | {s['aggregate_tokens_per_s'] / baseline:.2f}x | "
                f"{s['ttft_p50_s']:.2f} / {s['ttft_p99_s']:.2f} | {per['median']:.1f} ({per['p10']:.1f}-{per['p90']:.1f}) | "
                f"{s['mean_k']:.2f} | {s['tokens_per_target_forward']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [int(level) for level in summary["levels"]]
    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        rows = [summary["levels"][str(level)][mode] for level in levels]
        throughput.plot(levels, [r["aggregate_tokens_per_s"] for r in rows], marker="o", label=mode)
        ttft.plot(levels, [r["ttft_p50_s"] for r in rows], marker="o", label=f"{mode} p50")
        ttft.plot(levels, [r["ttft_p99_s"] for r in rows], marker="x", linestyle="--", label=f"{mode} p99")
    for axes, label in ((throughput, "aggregate tokens/s"), (ttft, "time to first token (s)")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(level) for level in levels])
        axes.set_xlabel("concurrent requests")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(summary["description"], fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,2,4,8,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends per level and mode")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--target", default="embedded", help="target model")
    parser.add_argument("--draft", default="smollm2-draft-l6", help="draft model or 'ngram'")
    parser.add_argument("--device", default="cpu", help="device of both model services")
    parser.add_argument("--prompts", type=Path, default=None, help="Spec-Bench-format JSONL (default: $SPECDEC_PROMPTS, else bench/prompts/)")
    parser.add_argument(
        "--max-prompt-chars", type=int, default=1000, help="skip longer prompts: under load, long prefills would dominate what is measured"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load")
    args = parser.parse_args(argv)

    levels = [int(level) for level in args.levels.split(",")]
    prompts = [p.text for p in load_prompts(args.prompts or default_prompts()) if len(p.text) <= args.max_prompt_chars]
    args.out.mkdir(parents=True, exist_ok=True)
    description = (
        f"target {args.target}, draft {args.draft}, {args.device}; {args.max_new_tokens} new tokens, greedy, "
        f"{args.requests_per_client} requests per client per level and mode, {len(prompts)} prompts of at most "
        f"{args.max_prompt_chars} characters"
    )
    device = ("--device", args.device)
    summary = {"description": description, "levels": {}}
    with ServiceStack(args.target, args.draft, log_dir=args.out / "logs", extra_target_args=device, extra_draft_args=device) as stack, open(
        args.out / "records.jsonl", "w"
    ) as records_file:
        asyncio.run(run_level(stack.address("orchestrator"), prompts[:2], 2, None, 1, 8))  # warm-up
        for index, level in enumerate(levels):
            modes = list(MODES.items())
            modes = modes[index % len(modes) :] + modes[: index % len(modes)]  # rotate: no mode always runs first
            results = {}
            for mode, k in modes:
                records, wall_s = asyncio.run(run_level(stack.address("orchestrator"), prompts, level, k, args.requests_per_client, args.max_new_tokens))
                for record in records:
                    records_file.write(json.dumps({"concurrency": level, "mode": mode, **record}) + "\n")
                results[mode] = summarize_level(records, wall_s)
                print(f"concurrency {level:2d} {mode:24s} {results[mode]['aggregate_tokens_per_s']:6.1f} tok/s  "
                      f"TTFT p50 {results[mode]['ttft_p50_s']:.2f} s  mean K {results[mode]['mean_k']:.2f}", flush=True)
            summary["levels"][str(level)] = {mode: results[mode] for mode in MODES}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "report.md").write_text(report_markdown(summary, description))
    plot(summary, args.out / "load.png")
    print(report_markdown(summary, description))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
