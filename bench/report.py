"""Summaries of benchmark records: per method (medians and spread over prompts), per Spec-Bench
category (the leaderboard's layout: speedup and mean accepted tokens per category), and files.

Speedups are per-prompt ratios against the baseline method's run of the same prompt in the same
benchmark run, then summarized; aggregate rates (tokens per target forward, latency per forward)
are ratios of sums, so long prompts weigh by their tokens.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from bench.hf_baselines import HF_GENERATE
from bench.services import TARGET_ONLY
from bench.theory import alpha_from_tokens_per_forward, theoretical_speedup

BASELINES = {"speedup": TARGET_ONLY, "speedup_vs_hf_generate": HF_GENERATE}


def spread(values: list[float]) -> dict:
    """Median, 10th and 90th percentile, min and max."""
    if not values:
        return {}
    deciles = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else [values[0]] * 9
    return {"median": statistics.median(values), "p10": deciles[0], "p90": deciles[-1], "min": min(values), "max": max(values), "n": len(values)}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def summarize_method(rows: list[dict], baselines: dict[str, dict[int, dict]]) -> dict:
    """One method's rows -> its summary. `baselines` maps each speedup's name to the baseline's
    rows by question_id; a speedup is the ratio of tokens per second on the same prompt."""
    speculative = [r for r in rows if r["k"]]
    summary: dict = {"prompts": len(rows), "tokens_per_second": spread([r["tokens_per_second"] for r in rows])}
    for name, baseline in baselines.items():
        paired = [(r, baseline[r["question_id"]]) for r in rows if r["question_id"] in baseline]
        summary[name] = spread([r["tokens_per_second"] / b["tokens_per_second"] for r, b in paired])
    paired = [(r, baselines["speedup"][r["question_id"]]) for r in rows if r["question_id"] in baselines["speedup"]]
    summary.update(
        time_to_first_token=spread([r["time_to_first_token"] for r in rows if r.get("time_to_first_token") is not None]),
        identical_to_baseline=sum(r["token_ids"] == b["token_ids"] for r, b in paired) if paired else None,
        target_ms_per_forward=_ms(rows, "target_seconds", "target_forward_passes"),
    )
    if speculative:
        drafted = sum(r["draft_tokens"] for r in speculative)
        rounds = sum(r["rounds"] for r in speculative)
        positions = defaultdict(int)
        for r in speculative:
            for i, count in enumerate(r["accepted_per_position"]):
                positions[i] += count
        summary.update(
            acceptance_rate=_ratio(sum(r["accepted_tokens"] for r in speculative), drafted),
            # committed tokens (the orchestrator's count, EOS included) per target forward
            tokens_per_target_forward=_ratio(
                sum(r["tokens_per_target_forward"] * r["target_forward_passes"] for r in speculative), sum(r["target_forward_passes"] for r in speculative)
            ),
            tokens_per_target_forward_per_prompt=spread([r["tokens_per_target_forward"] for r in speculative]),
            accepted_per_position=[positions[i] / rounds for i in sorted(positions)] if rounds else [],
            draft_ms_per_forward=_ms(speculative, "draft_seconds", "draft_forward_passes"),
            draft_ms_per_round=_ms(speculative, "draft_seconds", "rounds"),  # staged drafters: one pass may draft several tokens
            network_ms_per_round=1000 * _ratio(sum(r["network_seconds"] for r in speculative), rounds) if rounds else None,
            bytes_per_round=_ratio(sum(r["bytes_per_round"] * r["rounds"] for r in speculative), rounds),
        )
    return summary


def _ms(rows: list[dict], seconds: str, passes: str) -> float | None:
    total = sum(r.get(passes) or 0 for r in rows)
    return 1000 * sum(r.get(seconds) or 0 for r in rows) / total if total else None


def summarize(records: list[dict], verify_curve: list[float] | None = None) -> dict:
    """Per-method and per-category summaries; with the target's verify cost curve (T(n)/T(1),
    n = 1, 2, ...), each speculative method also gets its theoretical speedup."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
    baselines = {name: {r["question_id"]: r for r in by_method.get(method, [])} for name, method in BASELINES.items()}
    methods = {name: summarize_method(rows, baselines) for name, rows in by_method.items()}
    target_ms = methods.get(TARGET_ONLY, {}).get("target_ms_per_forward")
    by_method_k = {name: rows[0]["k"] for name, rows in by_method.items()}
    for name, summary in methods.items():
        if summary.get("draft_ms_per_forward") is not None and target_ms:
            # the cost coefficient c of Leviathan et al.: one draft forward / one target-only forward
            summary["draft_to_target_latency"] = summary["draft_ms_per_forward"] / target_ms
            k = by_method_k[name]
            if verify_curve and len(verify_curve) > k:
                summary.update(_theory(summary, k, verify_curve[k]))
    categories = sorted({r["category"] for r in records})
    table = {}
    for name, rows in by_method.items():
        table[name] = {}
        for category in categories + ["overall"]:
            subset = [r for r in rows if category in ("overall", r["category"])]
            summary = summarize_method(subset, baselines)
            table[name][category] = {
                "speedup": summary["speedup"].get("median"),
                "tokens_per_target_forward": 1.0 if name in (TARGET_ONLY, HF_GENERATE) else summary.get("tokens_per_target_forward"),
            }
    return {"baselines": BASELINES, "methods": methods, "categories": table}


def _theory(summary: dict, k: int, verify_cost: float) -> dict:
    alpha = alpha_from_tokens_per_forward(summary["tokens_per_target_forward"], k)
    corrected = theoretical_speedup(alpha, k, summary["draft_to_target_latency"], verify_cost)
    measured = summary["speedup"].get("median")
    return {
        "alpha": alpha,
        "verify_cost": verify_cost,
        "theoretical_speedup": corrected,
        "theoretical_speedup_uncorrected": theoretical_speedup(alpha, k, summary["draft_to_target_latency"]),
        "measured_over_theoretical": measured / corrected if measured else None,
    }


def category_markdown(summary: dict) -> str:
    """Spec-Bench leaderboard layout: per method and category, speedup x (mean accepted tokens)."""
    table = summary["categories"]
    categories = list(next(iter(table.values())).keys()) if table else []
    lines = ["| method | " + " | ".join(categories) + " |", "|---" * (len(categories) + 1) + "|"]
    for method, cells in table.items():
        formatted = []
        for category in categories:
            cell = cells[category]
            speedup = f"{cell['speedup']:.2f}x" if cell["speedup"] is not None else "-"
            tokens = f" ({cell['tokens_per_target_forward']:.2f})" if cell["tokens_per_target_forward"] is not None else ""
            formatted.append(speedup + tokens)
        lines.append(f"| {method} | " + " | ".join(formatted) + " |")
    return "\n".join(lines)


def methods_markdown(summary: dict) -> str:
    def fmt(value, pattern="{:.2f}"):
        return pattern.format(value) if value is not None else "-"

    lines = [
        "| method | tokens/s median (p10-p90) | speedup vs target-only, median (p10-p90) | vs HF generate | acceptance | tokens/target forward | draft ms/forward | target ms/forward | draft/target latency | theoretical speedup | measured/theoretical | network ms/round | bytes/round | identical to target-only |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["methods"].items():
        tps, speedup = m["tokens_per_second"], m["speedup"]
        lines.append(
            f"| {name} | {fmt(tps.get('median'), '{:.1f}')} ({fmt(tps.get('p10'), '{:.1f}')}-{fmt(tps.get('p90'), '{:.1f}')}) "
            f"| {fmt(speedup.get('median'))} ({fmt(speedup.get('p10'))}-{fmt(speedup.get('p90'))}) "
            f"| {fmt(m['speedup_vs_hf_generate'].get('median'))} "
            f"| {fmt(m.get('acceptance_rate'))} | {fmt(m.get('tokens_per_target_forward'))} | {fmt(m.get('draft_ms_per_forward'), '{:.1f}')} "
            f"| {fmt(m.get('target_ms_per_forward'), '{:.1f}')} | {fmt(m.get('draft_to_target_latency'), '{:.3f}')} "
            f"| {fmt(m.get('theoretical_speedup'))} | {fmt(m.get('measured_over_theoretical'))} "
            f"| {fmt(m.get('network_ms_per_round'), '{:.1f}')} | {fmt(m.get('bytes_per_round'), '{:.0f}')} "
            f"| {m['identical_to_baseline'] if m['identical_to_baseline'] is not None else '-'}/{m['speedup'].get('n', 0)} |"
        )
    return "\n".join(lines)


def write_outputs(out_dir: Path, records: list[dict], summary: dict) -> None:
    """summary.json, methods.csv, categories.csv and report.md (the records are already in
    records.jsonl, appended as they were measured)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with (out_dir / "methods.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        columns = ["acceptance_rate", "tokens_per_target_forward", "draft_ms_per_forward", "target_ms_per_forward", "draft_to_target_latency",
                   "alpha", "theoretical_speedup", "theoretical_speedup_uncorrected", "measured_over_theoretical", "network_ms_per_round", "bytes_per_round"]
        writer.writerow(["method", "prompts", "tokens_per_second_median", "speedup_median", "speedup_p10", "speedup_p90", "speedup_vs_hf_generate_median", *columns])
        for name, m in summary["methods"].items():
            writer.writerow([name, m["prompts"], m["tokens_per_second"].get("median"), m["speedup"].get("median"), m["speedup"].get("p10"),
                             m["speedup"].get("p90"), m["speedup_vs_hf_generate"].get("median"), *(m.get(c) for c in columns)])
    with (out_dir / "categories.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "category", "speedup_median", "tokens_per_target_forward"])
        for method, cells in summary["categories"].items():
            for category, cell in cells.items():
                writer.writerow([method, category, cell["speedup"], cell["tokens_per_target_forward"]])
    (out_dir / "report.md").write_text(
        f"## Methods\n\n{methods_markdown(summary)}\n\n## Per category: speedup (tokens per target forward)\n\n{category_markdown(summary)}\n"
    )
