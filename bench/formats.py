"""Weight formats side by side through the real services: for each `--dtype` (target and draft
services in that format, all stacks up at once), the target's Verify RPC timed from outside for
1..16 tokens, and per prompt, in a rotating order, target-only decoding, a fixed K and adaptive K
with the same draft. Greedy output must be identical to target-only decoding in the same format.

    python -m bench.formats [--formats float32,bfloat16,int8,int4,q4_1,q8_0,auto] [--limit 6] [--max-new-tokens 64]
                            [--threads 1] [--llama-bench PATH]

Writes records.jsonl and summary.json to --out and prints a table: T(1) and T(n)/T(1) of the
Verify RPC, tokens/s of each mode (median and 10th-90th percentile over prompts), speedups over
target-only in the same format and over float32 target-only, adaptive K's mean K, identical outputs.
With --llama-bench, llama.cpp's T(n) and decode rate on the embedded GGUF at the same thread count
(bench/llamacpp.py) are measured in the same run and printed beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import grpc

from bench import llamacpp
from bench.specbench import default_prompts, load_prompts
from harness.processes import ServiceStack
from specdec.v1 import common_pb2, orchestrator_pb2, target_pb2, target_pb2_grpc

RESULTS = Path(__file__).resolve().parent / "results" / "formats"
MODES = {"target-only": 0, "K=4": 4, "adaptive": None}


def verify_curve(stack: ServiceStack, sizes=range(1, 17), context: int = 200, repeats: int = 7) -> dict[int, float]:
    """Median seconds of a Verify RPC scoring n tokens (the pending token and n - 1 drafts), as a
    client sees it, from a context of `context` tokens. Each call commits a token or more, so the
    sizes take turns within each repeat and the context's growth (about 1 token a call) is shared
    evenly among them."""
    with grpc.insecure_channel(stack.address("target")) as channel:
        stub = target_pb2_grpc.TargetServiceStub(channel)
        session, prompt = "bench-formats", [(7 * i) % 1000 + 1 for i in range(context + 1)]
        stub.StartSession(common_pb2.StartSessionRequest(session_id=session, prompt_token_ids=prompt), timeout=300)
        held, times = context, {n: [] for n in sizes}
        try:
            for _ in range(repeats):
                for n in sizes:
                    item = target_pb2.VerifyItem(session_id=session, prefix_len=held, tokens=[5], draft_tokens=[0] * (n - 1),
                                                 sampling=common_pb2.SamplingParams(top_p=1.0))
                    started = time.perf_counter()
                    result = stub.Verify(target_pb2.VerifyRequest(items=[item]), timeout=60).results[0]
                    times[n].append(time.perf_counter() - started)
                    held += 1 + result.accepted
        finally:
            stub.EndSession(common_pb2.EndSessionRequest(session_id=session), timeout=60)
    return {n: statistics.median(t) for n, t in times.items()}


def generate(stack: ServiceStack, prompt: str, k: int | None, max_new_tokens: int, orchestrator: str = "orchestrator", **fields) -> dict:
    """One chat request through the stack's orchestrator (or its variant `orchestrator`), timed
    from outside; k None = adaptive K; `fields`: more GenerateRequest fields (sampling)."""
    request = orchestrator_pb2.GenerateRequest(max_new_tokens=max_new_tokens, **fields)
    if k is not None:
        request.num_speculative_tokens = k
    request.messages.add(role="user", content=prompt)
    started = time.perf_counter()
    response = stack.orchestrator_stub(name=orchestrator).Generate(request, timeout=1800)
    seconds = time.perf_counter() - started
    s = response.stats
    return {"token_ids": list(response.token_ids), "tokens": s.generated_tokens, "seconds": seconds,
            "tokens_per_second": s.generated_tokens / seconds, "tokens_per_target_forward": s.tokens_per_target_forward,
            "rounds": s.rounds, "pipelined_rounds": s.pipelined_rounds, "mean_k": s.draft_tokens / s.rounds if s.rounds else 0.0,
            "acceptance_rate": s.acceptance_rate, "text": response.text}


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    low, high = ordered[int(0.1 * (len(ordered) - 1))], ordered[int(0.9 * (len(ordered) - 1))]
    return f"{statistics.median(ordered):.2f} ({low:.2f}-{high:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.formats", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="float32,bfloat16,int4,auto", help="comma-separated --dtype values")
    parser.add_argument("--draft", default="smollm2-draft-l6")
    parser.add_argument("--prompts", type=Path, default=default_prompts(), help="Spec-Bench-format JSONL (default: $SPECDEC_PROMPTS, else bench/prompts/)")
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=0, help="threads of each model service (0: torch's default)")
    parser.add_argument("--llama-bench", type=Path, help="a llama.cpp build's llama-bench: add its figures at the same thread count")
    args = parser.parse_args(argv)
    formats = args.formats.split(",")
    prompts = load_prompts(args.prompts, args.limit)
    args.out.mkdir(parents=True, exist_ok=True)
    records, curves, info = [], {}, {}
    with contextlib.ExitStack() as exit_stack:
        stacks = {}
        for f in formats:
            flags = ("--dtype", f, "--threads", str(args.threads))
            stacks[f] = exit_stack.enter_context(ServiceStack(
                draft_model=args.draft, log_dir=args.out / "logs" / f, extra_target_args=flags, extra_draft_args=flags if args.draft != "ngram" else ()))
            print(f"{f}: serving", file=sys.stderr)
        for f, stack in stacks.items():
            curves[f] = verify_curve(stack)
            with grpc.insecure_channel(stack.address("target")) as channel:
                model = target_pb2_grpc.TargetServiceStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=60)
            info[f] = {"weight_format": model.weight_format, "reason": model.weight_format_reason}
            generate(stack, prompts[0].text, 4, 8)  # warm-up of both services' paths
            print(f"{f} ({model.weight_format}): Verify T(1) {1000 * curves[f][1]:.1f} ms, T(5)/T(1) {curves[f][5] / curves[f][1]:.2f}", file=sys.stderr)
        with (args.out / "records.jsonl").open("w") as out:
            for index, prompt in enumerate(prompts):
                order = [(f, m) for f in formats for m in MODES]
                order = order[index % len(order):] + order[: index % len(order)]
                for f, mode in order:
                    record = {"question_id": prompt.question_id, "category": prompt.category, "format": f, "mode": mode,
                              **generate(stacks[f], prompt.text, MODES[mode], args.max_new_tokens)}
                    records.append(record)
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                print(f"prompt {index + 1}/{len(prompts)} done", file=sys.stderr)
    summary = summarize(formats, records, curves, info)
    if args.llama_bench:
        summary["llama.cpp"] = llamacpp.measure(args.llama_bench, args.threads or 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(summary))
    return 0


def summarize(formats: list[str], records: list[dict], curves: dict, info: dict) -> dict:
    by = {(r["format"], r["mode"], r["question_id"]): r for r in records}
    questions = sorted({r["question_id"] for r in records})
    base = "float32" if "float32" in formats else formats[0]
    summary = {}
    for f in formats:
        rows = {}
        for mode in MODES:
            runs = [by[(f, mode, q)] for q in questions if (f, mode, q) in by]
            own = [by[(f, mode, q)]["tokens_per_second"] / by[(f, "target-only", q)]["tokens_per_second"] for q in questions]
            over_fp32 = [by[(f, mode, q)]["tokens_per_second"] / by[(base, "target-only", q)]["tokens_per_second"] for q in questions]
            rows[mode] = {
                "tokens_per_second": [r["tokens_per_second"] for r in runs],
                "speedup_vs_target_only": own, "speedup_vs_float32_target_only": over_fp32,
                "tokens_per_target_forward": statistics.median(r["tokens_per_target_forward"] for r in runs),
                "mean_k": statistics.mean(r["mean_k"] for r in runs),
                "identical": sum(by[(f, mode, q)]["token_ids"] == by[(f, "target-only", q)]["token_ids"] for q in questions),
            }
        t1 = curves[f][1]
        summary[f] = {**info[f], "verify_seconds": curves[f], "verify_ratio": {n: s / t1 for n, s in curves[f].items()},
                      "modes": rows, "prompts": len(questions)}
    return summary


def table(summary: dict) -> str:
    lines = ["| --dtype (chosen) | Verify T(1) ms | T(2)/T(1) | T(5)/T(1) | T(9)/T(1) | T(16)/T(1) | mode | tok/s median (p10-p90) "
             "| vs target-only | vs float32 target-only | tokens/forward | mean K | identical |", "|---" * 13 + "|"]
    peer = summary.get("llama.cpp")
    for f, s in summary.items():
        if f == "llama.cpp":
            continue
        ratio = s["verify_ratio"]
        for mode, row in s["modes"].items():
            lines.append(
                f"| {f} ({s['weight_format']}) | {1000 * s['verify_seconds'][1]:.1f} | {ratio[2]:.2f} | {ratio[5]:.2f} | {ratio[9]:.2f} | "
                f"{ratio[16]:.2f} | {mode} | {spread(row['tokens_per_second'])} | {spread(row['speedup_vs_target_only'])} | "
                f"{spread(row['speedup_vs_float32_target_only'])} | {row['tokens_per_target_forward']:.2f} | {row['mean_k']:.2f} | "
                f"{row['identical']}/{s['prompts']} |"
            )
    if peer:
        curve = peer["verify_seconds"]
        lines.append(
            f"| llama.cpp {peer['build']}, same GGUF, {peer['threads']} thread(s), in process | {1000 * curve[1]:.1f} | "
            + " | ".join(f"{curve[n] / curve[1]:.2f}" for n in (2, 5, 9, 16))
            + f" | decode (tg64) | {peer['decode_tokens_per_second']:.2f} | - | - | 1.00 | 0 | - |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
