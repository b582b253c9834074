"""Pipelined drafting and core layouts side by side: per layout one stack of the three services
plus a second orchestrator over the same model services with --pipeline-drafts, and per prompt
(the modes' order rotating from prompt to prompt) target-only decoding, each fixed K, the same K
pipelined, adaptive K and adaptive K pipelined. Greedy output must equal target-only's.

    python -m bench.pipeline [--layouts pinned,shared] [--draft smollm2-draft-l6] [--dtype auto] [-k 1,2]
                             [--prompts ../shared/data/specbench_dev.jsonl] [--limit 12] [--max-new-tokens 64]

Layouts: `pinned` puts the target alone on the first core and the draft and both orchestrators on
the second (harness.processes.separate_cores: the CPU analogue of separate GPUs, and target-only
decoding gets the same target core); `shared` lets every process run anywhere. Writes
records.jsonl and summary.json to --out and prints a table: tokens/s (median and 10th-90th
percentile over prompts), speedup over target-only in the same layout (median of the per-prompt
ratios, and their spread), tokens per target forward, the share of rounds whose Propose was
pipelined, and how many outputs equal target-only's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.formats import generate, spread
from bench.specbench import default_prompts, load_prompts
from harness.processes import ServiceStack, separate_cores

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline"
PIPELINED = "pipelined"  # the second orchestrator's name in the stack


def modes(ks: list[int]) -> dict[str, tuple[str, int | None]]:
    """mode -> (orchestrator, num_speculative_tokens; None = adaptive K)"""
    table = {"target-only": ("orchestrator", 0)}
    for k in ks:
        table[f"K={k}"], table[f"K={k} pipelined"] = ("orchestrator", k), (PIPELINED, k)
    return {**table, "adaptive": ("orchestrator", None), "adaptive pipelined": (PIPELINED, None)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="pinned,shared")
    parser.add_argument("--draft", default="smollm2-draft-l6")
    parser.add_argument("--dtype", default="auto", help="weight format of both model services")
    parser.add_argument("-k", default="1,2", help="K of the fixed-K modes, comma-separated (adaptive K's ceiling stays the orchestrator's)")
    parser.add_argument("--prompts", type=Path, default=default_prompts(), help="Spec-Bench-format JSONL (default: $SPECDEC_PROMPTS, else bench/prompts/)")
    parser.add_argument("--limit", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    prompts = load_prompts(args.prompts, args.limit)
    args.out.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.k.split(",")]
    mode_table, records = modes(ks), []
    with (args.out / "records.jsonl").open("w") as out:
        for layout in args.layouts.split(","):
            cores = separate_cores() if layout == "pinned" else None
            if layout == "pinned" and cores is None:
                print("pinned: fewer than two cores, skipped", file=sys.stderr)
                continue
            flags = ("--dtype", args.dtype)
            with ServiceStack(draft_model=args.draft, log_dir=args.out / "logs" / layout, extra_target_args=flags,
                              extra_draft_args=flags if args.draft != "ngram" else (), cores=cores,
                              orchestrator_variants={PIPELINED: ("--pipeline-drafts",)}) as stack:
                for orchestrator in ("orchestrator", PIPELINED):  # warm both orchestrators' paths
                    generate(stack, prompts[0].text, ks[-1], 8, orchestrator)
                for index, prompt in enumerate(prompts):
                    order = list(mode_table)
                    order = order[index % len(order):] + order[: index % len(order)]
                    for mode in order:
                        orchestrator, k = mode_table[mode]
                        record = {"layout": layout, "mode": mode, "question_id": prompt.question_id, "category": prompt.category,
                                  **generate(stack, prompt.text, k, args.max_new_tokens, orchestrator)}
                        records.append(record)
                        out.write(json.dumps(record) + "\n")
                        out.flush()
                    print(f"{layout}: prompt {index + 1}/{len(prompts)} done", file=sys.stderr)
    summary = summarize(records, list(mode_table))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(summary))
    return 0


def summarize(records: list[dict], mode_names: list[str]) -> dict:
    by = {(r["layout"], r["mode"], r["question_id"]): r for r in records}
    summary = {}
    for layout in dict.fromkeys(r["layout"] for r in records):
        questions = sorted({r["question_id"] for r in records if r["layout"] == layout})
        rows = {}
        for mode in mode_names:
            runs = [by[(layout, mode, q)] for q in questions]
            base = [by[(layout, "target-only", q)] for q in questions]
            rows[mode] = {
                "tokens_per_second": [r["tokens_per_second"] for r in runs],
                "speedup_vs_target_only": [r["tokens_per_second"] / b["tokens_per_second"] for r, b in zip(runs, base)],
                "tokens_per_target_forward": statistics.median(r["tokens_per_target_forward"] for r in runs),
                "pipelined_share": sum(r["pipelined_rounds"] for r in runs) / max(1, sum(r["rounds"] for r in runs)),
                "mean_k": statistics.mean(r["mean_k"] for r in runs),
                "identical": sum(r["token_ids"] == b["token_ids"] for r, b in zip(runs, base)),
            }
        summary[layout] = {"prompts": len(questions), "modes": rows}
    return summary


def table(summary: dict) -> str:
    lines = ["| layout | mode | tok/s median (p10-p90) | vs target-only | tokens/forward | mean K | pipelined rounds | identical |",
             "|---" * 8 + "|"]
    for layout, s in summary.items():
        for mode, row in s["modes"].items():
            lines.append(
                f"| {layout} | {mode} | {spread(row['tokens_per_second'])} | {spread(row['speedup_vs_target_only'])} | "
                f"{row['tokens_per_target_forward']:.2f} | {row['mean_k']:.2f} | {100 * row['pipelined_share']:.0f} % | "
                f"{row['identical']}/{s['prompts']} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
