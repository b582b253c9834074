"""What speculation buys and keeps under each way of sampling: per mode (greedy, standard sampled,
seed-stable sampled, with penalties, constrained to a JSON schema {"answer": string}, greedy and
sampled) target-only decoding and K
draft tokens per round side by side, on the same prompts through one stack of the three services,
the modes' order rotating from prompt to prompt.

    python -m bench.sampling_modes [--draft smollm2-draft-l6] [--dtype auto] [-k 4] [--limit 12]
                                   [--prompts ../shared/data/specbench_dev.jsonl] [--max-new-tokens 64]

Prints per mode: tokens/s with and without speculation (median and 10th-90th percentile over
prompts), the speedup (median of per-prompt ratios and their spread), the acceptance rate and
tokens per target forward, and how many speculative outputs equal target-only's: all of them
for the greedy modes and seed-stable sampling (same seed), which is the point of seed-stable
sampling; standard sampling draws other tokens with other K, so its count is only informative.
The JSON modes also count outputs that parse (a cut at --max-new-tokens leaves JSON unfinished).
Writes records.jsonl and summary.json to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.formats import generate, spread
from bench.specbench import default_prompts, load_prompts
from harness.processes import ServiceStack
from specdec.v1 import common_pb2

RESULTS = Path(__file__).resolve().parent / "results" / "sampling_modes"
SAMPLED = dict(temperature=0.8, top_p=0.95)
PENALTIES = dict(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.3)
# Any prompt can be answered in it: the same prompts with and without a constraint.
ANSWER_SCHEMA = json.dumps({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]})


def modes(seed: int) -> dict[str, dict]:
    """mode -> GenerateRequest fields besides the prompt, max_new_tokens and K."""
    return {
        "greedy": {},
        "sampled": dict(SAMPLED, seed=seed),
        "seed-stable": dict(SAMPLED, seed=seed, seed_stable=True),
        "penalties (greedy)": dict(PENALTIES),
        "json schema (greedy)": dict(grammar=common_pb2.Grammar(json_schema=ANSWER_SCHEMA)),
        "json schema (sampled)": dict(SAMPLED, seed=seed, grammar=common_pb2.Grammar(json_schema=ANSWER_SCHEMA)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sampling_modes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", default="smollm2-draft-l6")
    parser.add_argument("--dtype", default="auto", help="weight format of both model services")
    parser.add_argument("-k", type=int, default=4, help="draft tokens per round of the speculative runs")
    parser.add_argument("--prompts", type=Path, default=default_prompts(), help="Spec-Bench-format JSONL (default: $SPECDEC_PROMPTS, else bench/prompts/)")
    parser.add_argument("--limit", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    prompts = load_prompts(args.prompts, args.limit)
    args.out.mkdir(parents=True, exist_ok=True)
    names = list(modes(0))
    runs = [(mode, k) for mode in names for k in (0, args.k)]
    records = []
    flags = ("--dtype", args.dtype)
    with ServiceStack(draft_model=args.draft, log_dir=args.out / "logs", extra_target_args=flags,
                      extra_draft_args=flags if args.draft != "ngram" else ()) as stack, (args.out / "records.jsonl").open("w") as out:
        generate(stack, prompts[0].text, args.k, 8)  # warm-up, and the services' first grammar compiles their vocabulary's
        generate(stack, prompts[0].text, args.k, 8, grammar=common_pb2.Grammar(json_schema=ANSWER_SCHEMA))
        for index, prompt in enumerate(prompts):
            table = modes(seed=prompt.question_id)
            order = runs[index % len(runs):] + runs[: index % len(runs)]
            for mode, k in order:
                record = {"mode": mode, "k": k, "question_id": prompt.question_id, "category": prompt.category,
                          **generate(stack, prompt.text, k, args.max_new_tokens, **table[mode])}
                records.append(record)
                out.write(json.dumps(record) + "\n")
                out.flush()
            print(f"prompt {index + 1}/{len(prompts)} done", file=sys.stderr)
    summary = summarize(records, names, args.k)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table_of(summary, args.k))
    return 0


def summarize(records: list[dict], names: list[str], k: int) -> dict:
    by = {(r["mode"], r["k"], r["question_id"]): r for r in records}
    questions = sorted({r["question_id"] for r in records})
    summary = {"prompts": len(questions), "k": k, "modes": {}}
    for mode in names:
        base = [by[(mode, 0, q)] for q in questions]
        spec = [by[(mode, k, q)] for q in questions]
        summary["modes"][mode] = {
            "target_only_tokens_per_second": [r["tokens_per_second"] for r in base],
            "speculative_tokens_per_second": [r["tokens_per_second"] for r in spec],
            "speedup": [s["tokens_per_second"] / b["tokens_per_second"] for s, b in zip(spec, base)],
            "acceptance_rate": sum(r["acceptance_rate"] * r["mean_k"] * r["rounds"] for r in spec)
            / max(1e-9, sum(r["mean_k"] * r["rounds"] for r in spec)),
            "tokens_per_target_forward": statistics.median(r["tokens_per_target_forward"] for r in spec),
            "identical": sum(s["token_ids"] == b["token_ids"] for s, b in zip(spec, base)),
            "valid_json": sum(_parses(r["text"]) for r in spec) if mode.startswith("json") else None,
        }
    return summary


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def table_of(summary: dict, k: int) -> str:
    lines = [f"| mode | target-only tok/s | K={k} tok/s | speedup | acceptance | tokens/forward | identical to target-only | valid JSON |",
             "|---" * 8 + "|"]
    for mode, row in summary["modes"].items():
        valid = "-" if row["valid_json"] is None else f"{row['valid_json']}/{summary['prompts']}"
        lines.append(
            f"| {mode} | {spread(row['target_only_tokens_per_second'])} | {spread(row['speculative_tokens_per_second'])} | "
            f"{spread(row['speedup'])} | {100 * row['acceptance_rate']:.1f} % | {row['tokens_per_target_forward']:.2f} | "
            f"{row['identical']}/{summary['prompts']} | {valid} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
