"""make demo: start the three services on loopback with the embedded default models, stream a real
answer to a real prompt, then measure target-only decoding of the same prompt in the same run and
print acceptance, tokens per target forward and the speedup.

The default draft is the better of the two drafts trained for the embedded target
(drafts/smollm2-draft-l6, see README "Draft models"), and the prompt is a word problem of the kind
it drafts best (its training data is mostly GSM8K-style answers; the prompt is written here, not
taken from any dataset). `--draft ngram` shows prompt lookup, which shines when an answer copies
its prompt. Timings are medians of alternating runs; this machine is shared and noisy, so the
spread is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from harness.probes import free_port
from harness.processes import ServiceStack, separate_cores
from orchestrator.client import format_stats, stream
from specdec.v1 import orchestrator_pb2

PROMPT = (
    "A library lends 36 books on Monday and twice as many on Tuesday. On Wednesday it lends 15 fewer "
    "books than on Tuesday. How many books does it lend over the three days? Explain step by step."
)


def generation_request(k: int | None, max_new_tokens: int) -> orchestrator_pb2.GenerateRequest:
    request = orchestrator_pb2.GenerateRequest(max_new_tokens=max_new_tokens)
    request.messages.add(role="user", content=PROMPT)
    if k is not None:
        request.num_speculative_tokens = k
    return request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", default="smollm2-draft-l6", help="draft service model: a shipped draft's name, a model directory, or 'ngram'")
    parser.add_argument("-k", type=int, default=4, help="draft tokens per round")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs of each mode")
    parser.add_argument("--pin", action="store_true", help="target alone on one core, draft and orchestrator on another (separate hardware)")
    args = parser.parse_args()

    print("starting target_service, draft_service and orchestrator on loopback (the first start converts the embedded GGUF model)...")
    started = time.monotonic()
    cores = separate_cores() if args.pin else None
    http_port = free_port()
    with ServiceStack(draft_model=args.draft, cores=cores, extra_orchestrator_args=("--http-port", str(http_port))) as stack:
        if cores:
            print(f"pinned: {', '.join(f'{name} on CPU {sorted(cpus)}' for name, cpus in cores.items())}")
        print(f"all three SERVING after {time.monotonic() - started:.0f} s "
              f"(target {stack.address('target')}, draft {stack.address('draft')}, orchestrator {stack.address('orchestrator')}, "
              f"its OpenAI-compatible HTTP API http://127.0.0.1:{http_port}/v1: docs/http-api.md)\n")
        stub = stack.orchestrator_stub()
        stub.Generate(generation_request(0, 8), timeout=300)  # warm-up: first-call costs stay out of the figures
        print(f"user: {PROMPT}\n\nassistant (speculative, K={args.k}, draft={args.draft}):")
        streamed = stream(stack.address("orchestrator"), generation_request(args.k, args.max_new_tokens), timeout=900)
        print(f"[{format_stats(streamed)}]\n")

        print(f"measuring: {args.repeats} alternating runs each of target-only (K=0) and speculative (K={args.k})...")
        times: dict[int, list[float]] = {0: [], args.k: []}
        outputs: dict[int, list[int]] = {}
        last: dict[int, orchestrator_pb2.GenerateResponse] = {}
        for repeat in range(args.repeats):
            for k in ((0, args.k) if repeat % 2 == 0 else (args.k, 0)):
                response = stub.Generate(generation_request(k, args.max_new_tokens), timeout=900)
                times[k].append(response.stats.total_seconds)
                outputs[k], last[k] = list(response.token_ids), response
        speedups = [b / s for b, s in zip(times[0], times[args.k])]
        stats = last[args.k].stats
        print(f"  target-only : {statistics.median(times[0]):6.2f} s median ({min(times[0]):.2f}-{max(times[0]):.2f}), "
              f"{len(outputs[0]) / statistics.median(times[0]):.1f} tokens/s")
        print(f"  speculative : {statistics.median(times[args.k]):6.2f} s median ({min(times[args.k]):.2f}-{max(times[args.k]):.2f}), "
              f"{len(outputs[args.k]) / statistics.median(times[args.k]):.1f} tokens/s")
        print(f"  acceptance rate {stats.acceptance_rate:.2f}, tokens per target forward {stats.tokens_per_target_forward:.2f}, "
              f"bytes per round {stats.bytes_per_round:.0f}")
        print(f"  speedup {statistics.median(speedups):.2f}x median (range {min(speedups):.2f}-{max(speedups):.2f}x over {args.repeats} pairs)")
        identical = outputs[0] == outputs[args.k]
        print(f"  greedy output identical to target-only: {'yes' if identical else 'NO'}")
    print("services stopped.")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
