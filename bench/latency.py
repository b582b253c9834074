"""`python -m bench.latency`: the speedup of speculative decoding over target-only decoding when
the network between the orchestrator and the model services has 0, 2 and 10 ms round-trip time.

The three services run as subprocesses (bench/stack.py); the orchestrator reaches the target and
the draft through delay proxies (bench/netem.py), so both methods pay the same latency per call:
target-only decoding one round trip per token, speculation two (Propose, Verify) per round of up
to K+1 tokens. Per RTT and prompt, both run greedy back to back; their outputs must be identical.

    python -m bench.latency                       # embedded target, smollm2-draft-l6, K=4
    python -m bench.latency --quick               # tiny random model, seconds: checks the tool works

Writes records.jsonl (one line per generation) and summary.json under --out, and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from bench.specbench import default_prompts, load_prompts
from harness.netem import ProxyThread
from harness.processes import ServiceStack
from specdec.v1 import orchestrator_pb2

RESULTS = Path(__file__).resolve().parent / "results" / "latency"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtts", default="0,2,10", help="comma-separated round-trip times in ms")
    parser.add_argument("--target", default="embedded", help="target model")
    parser.add_argument("--draft", default="smollm2-draft-l6", help="draft model, or 'ngram'")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per round")
    parser.add_argument("--prompts", type=Path, default=default_prompts(), help="Spec-Bench-format JSONL (default: $SPECDEC_PROMPTS, else bench/prompts/)")
    parser.add_argument("--limit", type=int, default=6, help="first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="tiny random model for target and draft, 2 prompts, 16 tokens")
    return parser.parse_args(argv)


def measure(stub, text: str, k: int, max_new_tokens: int) -> tuple[list[int], float]:
    """Output ids and client-side seconds of one greedy generation."""
    request = orchestrator_pb2.GenerateRequest(max_new_tokens=max_new_tokens, num_speculative_tokens=k)
    request.messages.add(role="user", content=text)
    started = time.perf_counter()
    reply = stub.Generate(request, timeout=1800)
    return list(reply.token_ids), time.perf_counter() - started


def run(args: argparse.Namespace, stub, proxies: ProxyThread) -> list[dict]:
    prompts = load_prompts(args.prompts, limit=args.limit)
    records = []
    with open(args.out / "records.jsonl", "w") as log:
        for rtt in [float(r) for r in args.rtts.split(",")]:
            proxies.set_rtt(rtt)
            for prompt in prompts:
                baseline, baseline_s = measure(stub, prompt.text, 0, args.max_new_tokens)
                speculative, speculative_s = measure(stub, prompt.text, args.k, args.max_new_tokens)
                record = {
                    "rtt_ms": rtt, "question_id": prompt.question_id, "tokens": len(baseline), "k": args.k,
                    "target_only_s": baseline_s, "speculative_s": speculative_s, "identical": baseline == speculative,
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                records.append(record)
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Per RTT: the speedup as total target-only time over total speculative time."""
    rows = []
    for rtt in sorted({r["rtt_ms"] for r in records}):
        at = [r for r in records if r["rtt_ms"] == rtt]
        target_only, speculative = sum(r["target_only_s"] for r in at), sum(r["speculative_s"] for r in at)
        rows.append({
            "rtt_ms": rtt, "prompts": len(at), "tokens": sum(r["tokens"] for r in at),
            "target_only_s": target_only, "speculative_s": speculative, "speedup": target_only / speculative,
            "all_identical": all(r["identical"] for r in at),
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        if args.quick:
            from harness.tiny import tiny_model_for

            tiny = tiny_model_for(cleanup)
            args.target, args.draft, args.limit, args.max_new_tokens = tiny, tiny, 2, 16
        stack = ServiceStack(target_model=args.target, draft_model=args.draft, log_dir=args.out / "logs")
        proxies = cleanup.enter_context(contextlib.closing(ProxyThread()))
        stack.route_orchestrator(proxies.add(stack.address("target")).address, proxies.add(stack.address("draft")).address)
        cleanup.enter_context(stack)
        rows = summarize(run(args, stack.orchestrator_stub(), proxies))
    settings = {"target": args.target, "draft": args.draft, "k": args.k, "max_new_tokens": args.max_new_tokens, "quick": args.quick}
    (args.out / "summary.json").write_text(json.dumps({"settings": settings, "by_rtt": rows}, indent=2) + "\n")
    print(f"{'RTT ms':>7} {'prompts':>7} {'target-only s':>13} {'K=' + str(args.k) + ' s':>8} {'speedup':>8} identical")
    for row in rows:
        print(f"{row['rtt_ms']:>7g} {row['prompts']:>7} {row['target_only_s']:>13.2f} {row['speculative_s']:>8.2f} "
              f"{row['speedup']:>7.2f}x {row['all_identical']}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
