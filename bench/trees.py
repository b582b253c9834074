"""Draft trees against chains, side by side: `python -m bench.trees [--limit N] [--drafter NAME]`.

In one process (no network: what differs between the variants is the speculation alone), the
embedded target and one drafter, greedy, on the first turns of the dev split. Every prompt runs
every variant, in an order that rotates from prompt to prompt: chains of K drafts and trees (static
and EAGLE-2 dynamic, trees.TreeShape) whose verify scores a budget of 8, 16 or 32 tokens (nodes + the
pending one). Per variant: tokens per target forward, tokens/s, draft and verify time per round,
and per-depth acceptance (the share of rounds that accept at least d drafts). Also the target's
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
from specdec.trees import TreeShape
from target_service.engine import TargetEngine

# (label, K = depth, tree shape or None); the tree budgets: nodes <= 7, 15, 31
VARIANTS = (
    ("chain K=4", 4, None),
    ("chain K=7", 7, None),
    ("static 2,1,1 (6)", 3, "2,1,1"),
    ("dynamic 4/7", 4, "4/7"),
    ("static 3,2,1 (15)", 3, "3,2,1"),
    ("dynamic 4/15", 5, "4/15"),
    ("static 4,2,1,1 (28)", 4, "4,2,1,1"),
    ("dynamic 4/31", 6, "4/31"),
)


def verify_costs(model, sizes=(1, 5, 8, 16, 32), repeats: int = 7) -> dict[int, float]:
    """Seconds of one forward pass scoring n tokens of one sequence after 200 cached ones."""
    return {n: lm.forward_seconds(model, n, context=200, repeats=repeats) for n in sizes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trees", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=Path, default=default_prompts())
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only")
    parser.add_argument("--drafter", default="drafts/smollm2-draft-l6", help="a draft model directory, early-exit:L, or ngram")
    parser.add_argument("--dtype", default="auto", help="weight format of target and draft")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--variants", default="", help="comma-separated indices into VARIANTS (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else list(VARIANTS)

    target = load_causal_lm("embedded", "cpu", args.dtype)
    target_engine = TargetEngine(target, max_speculative_tokens=32)
    target_engine.warm_up()
    drafter, context = build_drafter(DraftConfig(model=args.drafter, dtype=args.dtype))
    drafter.warm_up()
    draft_engine = DraftEngine(drafter, max_context=min(context, target.max_context), max_speculative_tokens=32)
    engines = {
        label: GenerationEngine(target.tokenizer, InProcessTarget(target_engine), target_engine.info(), InProcessDraft(draft_engine),
                                draft_engine.info(), KSettings(k, False, 32), draft_tree=TreeShape.parse(shape or ""))
        for label, k, shape in variants
    }
    prompts = load_prompts(args.prompts, args.limit)
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
        same = len({tuple(o) for o in outputs.values()}) == 1
        for label in outputs:
            rows[label][-1]["identical_to_others"] = same
        eta = (time.monotonic() - started) / (index + 1) * (len(prompts) - index - 1)
        print(f"[{index + 1}/{len(prompts)}] q{prompt.question_id} {prompt.category}: "
              + " | ".join(f"{label} {rows[label][-1]['tokens_per_target_forward']:.2f}" for label, _, _ in variants)
              + f"{'' if same else ' OUTPUTS DIFFER'} | ETA {eta / 60:.1f} min", flush=True)

    costs = verify_costs(target.model)
    summary = {"drafter": args.drafter, "weight_format": lm.weight_format(target.model), "prompts": len(prompts),
               "max_new_tokens": args.max_new_tokens, "threads": args.threads,
               "verify_ms": {n: round(1000 * s, 2) for n, s in costs.items()},
               "verify_cost_ratio": {n: round(s / costs[1], 2) for n, s in costs.items()},
               "all_outputs_identical": all(r["identical_to_others"] for r in rows[variants[0][0]]), "variants": {}}
    chain = statistics.median(r["tokens_per_target_forward"] for r in rows[variants[0][0]])
    for label, k, shape in variants:
        measured = rows[label]
        depth_rates = [statistics.mean(r["accepted_at_least"][d] if d < len(r["accepted_at_least"]) else 0.0 for r in measured)
                       for d in range(max(len(r["accepted_at_least"]) for r in measured) if measured else 0)]
        tpf = [r["tokens_per_target_forward"] for r in measured]
        summary["variants"][label] = {
            "k": k, "tree": shape, "tokens_per_target_forward": spread(tpf), "vs_first": round(statistics.median(tpf) / chain, 3),
            "tokens_per_s": spread([r["tokens_per_s"] for r in measured]),
            "draft_ms_per_round": spread([r["draft_ms_per_round"] for r in measured]),
            "verify_ms_per_round": spread([r["verify_ms_per_round"] for r in measured]),
            "accepted_at_least_depth": [round(rate, 3) for rate in depth_rates[:8]],
        }
    out = args.out or Path("bench/results/trees") / f"{Path(args.drafter).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))
    plot(summary, out.with_suffix(".png"))
    return 0


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
        axis.bar(range(len(labels)), medians, yerr=[low, high], capsize=3, color=["#888" if "chain" in label else "#3a7" for label in labels])
        axis.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        axis.set_title(title)
    fig.suptitle(f"draft trees vs chains: {summary['drafter']}, target in {summary['weight_format']}, {summary['prompts']} dev prompts, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
