"""Draft trees against chains, side by side: `python -m bench.trees [--limit N] [--drafter NAME]`.

In one process (no network: what differs between the variants is the speculation alone), the
embedded target and one drafter, greedy, on the first turns of the dev split. Every prompt runs
every variant, in an order that rotates from prompt to prompt: chains of K drafts and trees (static
and EAGLE-2 dynamic, trees.TreeShape) whose verify scores a budget of 8, 16 or 32 tokens (nodes + the
pending one), and target-only decoding (K = 0), the reference every output must equal (greedy).
Per variant: tokens per target forward, tokens/s, draft and verify time per round, and per-depth
acceptance (the share of rounds that accept at least d drafts). Also the target's
verify cost T(n) at each budget, in the weight format it runs (the trees pay where it is flat).
Medians and spread; everything in bench/results/trees/<drafter>.json and a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.report import spread
from bench.specbench import default_prompts, load_prompts
from draft_service.engine import DraftEngine
from draft_service.server import DraftConfig, build_drafter
from harness.inprocess import run_generation
from orchestrator.backends import InProcessDraft, InProcessTarget
from orchestrator.generation import GenerationEngine, GenerationRequest
from orchestrator.policy import KSettings
from specdec import lm
from specdec.models import load_causal_lm
from target_service.engine import TargetEngine

# (label, K = depth, tree shape or None); in brackets the tokens a verify scores (nodes + 1)
VARIANTS = (
    ("target only", 0, None),
    ("chain K=4", 4, None),
    ("chain K=7 (8)", 7, None),
    ("dynamic 8,4/7 (8)", 4, "8,4/7"),
    ("chain K=15 (16)", 15, None),
    ("static 3,2,1 (16)", 3, "3,2,1"),
    ("dynamic 8,4/15 (16)", 4, "8,4/15"),
    ("dynamic 8,4/31 (32)", 5, "8,4/31"),
)


def parse_variant(entry: str) -> tuple[str, int, str | None]:
    """An index into VARIANTS, or K:SHAPE (a tree K deep; SHAPE as --draft-tree), or K:chain."""
    if entry.isdigit():
        return VARIANTS[int(entry)]
    k, _, shape = entry.partition(":")
    return (f"chain K={k}", int(k), None) if shape == "chain" else (f"K={k} {shape}", int(k), shape)


def verify_costs(model, sizes=(1, 5, 8, 16, 32), repeats: int = 7) -> dict[int, float]:
    """Seconds of one forward pass scoring n tokens of one sequence after 200 cached ones."""
    return {n: lm.forward_seconds(model, n, context=200, repeats=repeats) for n in sizes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trees", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=Path, default=default_prompts())
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only")
    parser.add_argument("--per-category", type=int, default=None, help="the first N prompts of each category only")
    parser.add_argument("--drafter", default="drafts/smollm2-draft-l6", help="a draft model directory, early-exit:L, or ngram")
    parser.add_argument("--dtype", default="auto", help="weight format of target and draft")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (where a verify of 32 tokens costs about one step)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--variants", default="", help="';'-separated: indices into VARIANTS, or K:SHAPE (e.g. '0;4:8/15'); default: all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(entry) for entry in args.variants.split(";")] if args.variants else list(VARIANTS)

    target = load_causal_lm("embedded", args.device, args.dtype)
    target_engine = TargetEngine(target, max_speculative_tokens=32)
    target_engine.warm_up()
    drafter, context = build_drafter(DraftConfig(model=args.drafter, dtype=args.dtype, device=args.device))
    drafter.warm_up()
    draft_engine = DraftEngine(drafter, max_context=min(context, target.max_context), max_speculative_tokens=32)
    engines = {
        label: GenerationEngine(target.tokenizer, InProcessTarget(target_engine), target_engine.info(), InProcessDraft(draft_engine),
                                draft_engine.info(), KSettings(k, False, 32), draft_tree=shape or "")
        for label, k, shape in variants
    }
    prompts = load_prompts(args.prompts, args.limit, args.per_category)
    out = args.out or Path("bench/results/trees") / f"{Path(args.drafter).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    progress = out.with_suffix(".jsonl")  # each prompt's rows as soon as measured
    progress.write_text("")
    rows: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    started = time.monotonic()
    for index, prompt in enumerate(prompts):
        order = variants[index % len(variants):] + variants[: index % len(variants)]
        outputs = {}
        for label, k, _ in order:
            request = GenerationRequest(messages=(("user", prompt.text),), max_new_tokens=args.max_new_tokens, num_speculative_tokens=k)
            began = time.perf_counter()
            events = run_generation(engines[label], request)
            wall = time.perf_counter() - began
            stats = events[-1].stats
            outputs[label] = [t for e in events for t in e.token_ids]
            rows[label].append({
                "question_id": prompt.question_id, "category": prompt.category, "tokens": stats.generated_tokens,
                "tokens_per_target_forward": stats.tokens_per_target_forward, "tokens_per_s": stats.generated_tokens / wall,
                "draft_ms_per_round": 1000 * stats.draft_seconds / max(stats.rounds, 1),
                "verify_ms_per_round": 1000 * stats.target_seconds / max(stats.rounds, 1),
                "rounds": stats.rounds, "accepted_at_least": [a / max(stats.rounds, 1) for a in stats.accepted_per_position],
            })
        reference = outputs[variants[0][0]]  # the first variant's (target-only by default)
        for label in outputs:
            rows[label][-1]["identical_to_first"] = outputs[label] == reference
        same = all(o == reference for o in outputs.values())
        with progress.open("a") as handle:
            handle.write(json.dumps({label: rows[label][-1] for label in outputs}) + "\n")
        eta = (time.monotonic() - started) / (index + 1) * (len(prompts) - index - 1)
        print(f"[{index + 1}/{len(prompts)}] q{prompt.question_id} {prompt.category}: "
              + " | ".join(f"{label} {rows[label][-1]['tokens_per_target_forward']:.2f}" for label, _, _ in variants)
              + f"{'' if same else ' OUTPUTS DIFFER'} | ETA {eta / 60:.1f} min", flush=True)

    costs = verify_costs(target.model)
    summary = {"drafter": args.drafter, "weight_format": lm.weight_format(target.model), "prompts": len(prompts),
               "max_new_tokens": args.max_new_tokens, "threads": args.threads,
               "verify_ms": {n: round(1000 * s, 2) for n, s in costs.items()},
               "verify_cost_ratio": {n: round(s / costs[1], 2) for n, s in costs.items()},
               "identical_to_first": {label: sum(r["identical_to_first"] for r in rows[label]) for label, _, _ in variants},
               "variants": {}}
    chain_label = next((label for label, k, shape in variants if k and shape is None), variants[0][0])  # the first chain that drafts
    summary["chain_reference"] = chain_label
    chain = statistics.median(r["tokens_per_target_forward"] for r in rows[chain_label])
    first_speed = statistics.median(r["tokens_per_s"] for r in rows[variants[0][0]])
    for label, k, shape in variants:
        measured = rows[label]
        depth_rates = [statistics.mean(r["accepted_at_least"][d] if d < len(r["accepted_at_least"]) else 0.0 for r in measured)
                       for d in range(max(len(r["accepted_at_least"]) for r in measured) if measured else 0)]
        tpf = [r["tokens_per_target_forward"] for r in measured]
        summary["variants"][label] = {
            "k": k, "tree": shape, "tokens_per_target_forward": spread(tpf), "vs_chain": round(statistics.median(tpf) / chain, 3),
            "vs_chain_per_prompt": spread([t / c["tokens_per_target_forward"] for t, c in zip(tpf, rows[chain_label])]),
            "tokens_per_s": spread([r["tokens_per_s"] for r in measured]),
            "tokens_per_s_vs_first": round(statistics.median(r["tokens_per_s"] for r in measured) / first_speed, 3),
            "draft_ms_per_round": spread([r["draft_ms_per_round"] for r in measured]),
            "verify_ms_per_round": spread([r["verify_ms_per_round"] for r in measured]),
            "accepted_at_least_depth": [round(rate, 3) for rate in depth_rates[:8]],
        }
    out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))
    plot(summary, out.with_suffix(".png"))
    return 0


def _colour(variant: dict) -> str:
    """Target-only blue, chains grey, trees green."""
    return "#37a" if not variant["k"] else "#888" if variant["tree"] is None else "#3a7"


def plot(summary: dict, path: Path) -> None:
    """Tokens per target forward and tokens/s per variant (medians, p10-p90 bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary["variants"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, key, title in ((axes[0], "tokens_per_target_forward", "tokens per target forward"), (axes[1], "tokens_per_s", "tokens/s (in process)")):
        values = [summary["variants"][label][key] for label in labels]
        medians = [v["median"] for v in values]
        low = [m - v["p10"] for m, v in zip(medians, values)]
        high = [v["p90"] - m for m, v in zip(medians, values)]
        axis.bar(range(len(labels)), medians, yerr=[low, high], capsize=3, color=[_colour(summary["variants"][label]) for label in labels])
        axis.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        axis.set_title(title)
    fig.suptitle(f"draft trees vs chains: {summary['drafter']}, target in {summary['weight_format']}, {summary['prompts']} dev prompts, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
