"""What losing a target replica costs a stream: the longest wait for tokens from the kill (-9) of
the replica holding the stream's session on (detection, the session's rebuild on the other
replica, its prefill, the round), per context length, beside the stream's usual gap between two
messages. Two target replicas and two n-gram drafts; each trial
streams a prompt of about L tokens, kills the holder after 16 tokens, checks that the output equals
an undisturbed run's, and starts the killed replica again.

    python -m bench.rebuild_cost [--lengths 128,512,1024] [--trials 3] [--dtype auto]

Writes records.jsonl and summary.json to --out and prints a table: context length, the gap after
the kill (median and range over trials), the stream's usual gap (median), and outputs identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import grpc

from bench.formats import spread
from harness.processes import ServiceStack
from specdec.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, target_pb2_grpc

RESULTS = Path(__file__).resolve().parent / "results" / "rebuild_cost"
PARAGRAPH = ("The river runs from the mountains to the sea, past towns and fields, and every spring it floods the "
             "low meadows where the farmers keep their sheep. ")
KILL_AFTER = 16  # tokens received before the kill


def holder(stack: ServiceStack) -> str:
    for name in stack.targets:
        with grpc.insecure_channel(stack.address(name)) as channel:
            if target_pb2_grpc.TargetServiceStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).active_sessions:
                return name
    raise RuntimeError("no target replica holds the stream's session")


def trial(stack: ServiceStack, stub, request, kill: bool) -> dict:
    """One stream; with `kill`, the holder is killed after KILL_AFTER tokens (then restarted)."""
    tokens, arrivals, killed_at, victim = [], [], None, None
    for message in stub.GenerateStream(request, timeout=600):
        now = time.perf_counter()
        if message.token_ids:
            arrivals.append(now)
        tokens += message.token_ids
        if kill and killed_at is None and len(tokens) >= KILL_AFTER:
            victim = holder(stack)
            killed_at = time.perf_counter()
            stack.processes[victim].kill()
            stack.processes[victim].wait(30)
        final = message
    record = {"tokens": tokens, "rebuilds": final.stats.target_rebuilds,
              "usual_gap_s": statistics.median(b - a for a, b in zip(arrivals, arrivals[1:])) if len(arrivals) > 2 else 0.0}
    if killed_at is not None:
        # the stall: the longest wait for tokens from the kill on (messages already on their way
        # when it happened arrive first, so the first arrival after it is not the measure)
        after = [killed_at] + [t for t in arrivals if t > killed_at]
        record["gap_after_kill_s"] = max(b - a for a, b in zip(after, after[1:]))
        stack.restart(victim)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rebuild_cost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="128,512,1024", help="context lengths (prompt tokens, about), comma-separated")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="weight format of the target replicas")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from orchestrator.server import load_tokenizer

    tokenizer = load_tokenizer("embedded")
    summary = {}
    with ServiceStack(draft_model="ngram", log_dir=args.out / "logs", extra_target_args=("--dtype", args.dtype), replicas=2,
                      extra_orchestrator_args=("--target-health-period-s", "0.5")) as stack, \
            (args.out / "records.jsonl").open("w") as out, grpc.insecure_channel(stack.address("orchestrator")) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        for length in (int(n) for n in args.lengths.split(",")):
            words = PARAGRAPH * (length // len(tokenizer(PARAGRAPH).input_ids) + 1)
            prompt = tokenizer.decode(tokenizer(words).input_ids[:length])
            request = orchestrator_pb2.GenerateRequest(prompt=prompt, max_new_tokens=args.max_new_tokens, num_speculative_tokens=2)
            reference = trial(stack, stub, request, kill=False)["tokens"]
            runs = []
            for index in range(args.trials):
                record = {"length": length, "trial": index, **trial(stack, stub, request, kill=True)}
                record["identical"] = record.pop("tokens") == reference
                runs.append(record)
                out.write(json.dumps(record) + "\n")
                out.flush()
                print(f"length {length}: trial {index + 1}/{args.trials}, gap {record['gap_after_kill_s']:.3f} s", file=sys.stderr)
            summary[length] = {"gap_after_kill_s": [r["gap_after_kill_s"] for r in runs], "usual_gap_s": statistics.median(r["usual_gap_s"] for r in runs),
                               "identical": sum(r["identical"] for r in runs), "trials": len(runs), "rebuilds": sum(r["rebuilds"] for r in runs)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("| context tokens | gap after the kill, s: median (range) | usual gap between messages, s | identical | rebuilds |")
    print("|---|---|---|---|---|")
    for length, row in summary.items():
        print(f"| {length} | {spread(row['gap_after_kill_s'])} | {row['usual_gap_s']:.3f} | {row['identical']}/{row['trials']} | {row['rebuilds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
