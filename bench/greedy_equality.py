"""Greedy equality on Spec-Bench prompts: speculative output must be token-identical to target-only
decoding through the same services.

    python -m bench.greedy_equality [--prompts ../shared/data/specbench_dev.jsonl] [--limit N] [--dtype auto]

For each prompt (first turn, as a chat message) it generates with K = 0 and with K, in alternating
order, and compares the token ids. Where they differ, it measures the gap between the target's two
best logits at the first differing position (one forward pass over prompt + common prefix): below
1e-4 the difference is a floating-point tie between a K+1-token and a 1-token forward pass, not a
bug. Both services run in the weight format `--dtype` (the gap is measured in the format the
target chose). It also reports the speedup of each prompt (target-only time / speculative time), measured
side by side. Each prompt's result is appended to bench/results/greedy_equality.jsonl as soon as
it is measured, and `--resume` skips the prompts already there, so a long run can be interrupted
and continued; the summary is written to bench/results/greedy_equality.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import grpc
import torch

from bench.services import SELF_DRAFT
from bench.specbench import default_prompts, load_prompts
from harness.processes import ServiceStack
from orchestrator.generation import encode_prompt
from specdec import lm
from specdec.models import load_causal_lm
from specdec.v1 import common_pb2, orchestrator_pb2, target_pb2_grpc
from specdec.weights import AUTO, FORMATS

TIE = 1e-4


def top2_gap(model, ids: list[int]) -> float:
    """The gap between the two best logits after `ids`, by the services' own forward path."""
    logits = lm.forward(model, [lm.SequenceCache()], [ids], logits_for_last=1)[0][-1]
    best = torch.topk(logits, 2).values
    return float(best[0] - best[1])


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, default=default_prompts(), help="Spec-Bench-format JSONL (default: $SPECDEC_PROMPTS, else bench/prompts/)")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--draft", default="ngram", help="draft model for the draft service, or self-draft:X (the target's --self-draft X)")
    parser.add_argument("--dtype", default=AUTO, choices=(AUTO, *FORMATS), help="weight format of both model services")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "greedy_equality.json")
    parser.add_argument("--resume", action="store_true", help="keep earlier per-prompt results and skip their prompts")
    parser.add_argument("--draft-tree", default="", help="the orchestrator's --draft-tree: trees instead of chains, K deep")
    args = parser.parse_args()

    prompts = load_prompts(args.prompts, args.limit)
    progress = args.out.with_suffix(".jsonl")
    progress.parent.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        progress.unlink(missing_ok=True)
    rows = [json.loads(line) for line in progress.read_text().splitlines()] if progress.exists() else []
    done = {row["question_id"] for row in rows}
    todo = [p for p in prompts if p.question_id not in done]
    started = time.monotonic()
    flags = ("--dtype", args.dtype)
    self_draft = args.draft.removeprefix(SELF_DRAFT) if args.draft.startswith(SELF_DRAFT) else ""
    tree_flags = ("--draft-tree", args.draft_tree) if args.draft_tree else ()
    with ServiceStack(draft_model=args.draft, extra_target_args=(*flags, "--max-speculative-tokens", "32"),
                      extra_draft_args=flags if args.draft != "ngram" else (), self_draft=self_draft, extra_orchestrator_args=tree_flags) as stack:
        with grpc.insecure_channel(stack.address("target")) as channel:
            chosen = target_pb2_grpc.TargetServiceStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=60).weight_format
        loaded = load_causal_lm("embedded", dtype=chosen)  # for the top-2 gaps, in the target's format
        stub = stack.orchestrator_stub()
        for index, prompt in enumerate(todo):
            question = prompt.text
            outputs = {}
            for k in ((0, args.k) if index % 2 == 0 else (args.k, 0)):
                request = orchestrator_pb2.GenerateRequest(max_new_tokens=args.max_new_tokens, num_speculative_tokens=k)
                request.messages.add(role="user", content=question)
                outputs[k] = stub.Generate(request, timeout=900)
            baseline, speculative = outputs[0], outputs[args.k]
            base_ids, spec_ids = list(baseline.token_ids), list(speculative.token_ids)
            diff = first_difference(base_ids, spec_ids)
            row = {
                "question_id": prompt.question_id,
                "category": prompt.category,
                "identical": diff is None,
                "first_difference": diff,
                "tokens": len(base_ids),
                "speedup": baseline.stats.total_seconds / speculative.stats.total_seconds,
                "acceptance_rate": speculative.stats.acceptance_rate,
                "tokens_per_target_forward": speculative.stats.tokens_per_target_forward,
                "bytes_per_round": speculative.stats.bytes_per_round,
            }
            if diff is not None:
                prompt_ids, _ = encode_prompt(loaded.tokenizer, "", (("user", question),))
                row["top2_gap"] = top2_gap(loaded.model, prompt_ids + base_ids[:diff])  # in the services' format
            rows.append(row)
            with progress.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            elapsed = time.monotonic() - started
            eta = elapsed / (index + 1) * (len(todo) - index - 1)
            print(
                f"[{len(rows)}/{len(prompts)}] q{prompt.question_id} {prompt.category}: "
                f"{'identical' if diff is None else 'differs at %d (gap %.2e)' % (diff, row['top2_gap'])} "
                f"speedup {row['speedup']:.2f} accept {row['acceptance_rate']:.2f} | ETA {eta / 60:.1f} min",
                flush=True,
            )
    rows = [r for r in rows if r["question_id"] in {p.question_id for p in prompts}]
    differing = [r for r in rows if not r["identical"]]
    ties = [r for r in differing if r["top2_gap"] < TIE]
    speedups = [r["speedup"] for r in rows]
    summary = {
        "prompts": len(rows),
        "identical": len(rows) - len(differing),
        "differing_explained_by_ties": len(ties),
        "differing_unexplained": len(differing) - len(ties),
        "k": args.k,
        "draft": args.draft,
        "draft_tree": args.draft_tree,
        "weight_format": chosen,
        "max_new_tokens": args.max_new_tokens,
        "speedup_median": statistics.median(speedups),
        "speedup_p10_p90": [statistics.quantiles(speedups, n=10)[0], statistics.quantiles(speedups, n=10)[-1]] if len(speedups) > 1 else None,
        "acceptance_rate_median": statistics.median(r["acceptance_rate"] for r in rows),
        "tokens_per_target_forward_median": statistics.median(r["tokens_per_target_forward"] for r in rows),
    }
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
