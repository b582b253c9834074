"""The seed notebook's analysis on real models, from one or more benchmark runs (`python -m bench`).

`python -m bench.seed_analysis --runs OUT_T0,OUT_T05,OUT_T1 --out DIR` writes:
- speedup_surface.png: the seed's formula, best K per point, over per-token acceptance alpha and
  draft cost c (one draft forward / one target forward), with a flat verify (the paper's) and with
  the target's measured verify cost T(K + 1) / T(1); every measured method of the first run is a
  point at its (alpha, c), labelled with its measured speedup;
- acceptance_vs_temperature.png: acceptance rate and tokens per target forward per method across
  the runs' temperatures;
- seed_claims.md: the speedups the seed claims per task beside what the runs measured on the
  matching Spec-Bench categories (median per-prompt speedup, and tokens per target forward);
- analysis.json: the numbers behind all three.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.services import TARGET_ONLY  # noqa: E402
from bench.theory import theoretical_speedup  # noqa: E402

# The seed's claimed real-world speedups, and the Spec-Bench categories that match each task.
SEED_CLAIMS = {
    "code generation": ((2.5, 3.5), ("coding",)),
    "story writing": ((2.0, 3.0), ("writing",)),
    "chat": ((1.5, 2.5), ("roleplay", "humanities")),
    "technical Q&A": ((1.8, 2.8), ("stem", "qa")),
}
MAX_K = 8


def load_run(directory: Path) -> dict:
    summary = json.loads((directory / "summary.json").read_text())
    records = [json.loads(line) for line in (directory / "records.jsonl").read_text().splitlines() if line.strip()]
    temperature = float(summary.get("settings", {}).get("temperature", 0.0))
    return {"directory": str(directory), "temperature": temperature, "summary": summary, "records": records}


def best_speedup(alpha: float, cost: float, verify_curve: list[float] | None) -> float:
    """The seed's formula at its best K <= MAX_K (K = 0: 1.0); flat verify when no curve, else
    T(K + 1) / T(1) from the curve, and only the K it measured."""
    best = 1.0
    for k in range(1, MAX_K + 1 if verify_curve is None else min(MAX_K, len(verify_curve) - 1) + 1):
        verify = 1.0 if verify_curve is None else verify_curve[k]
        best = max(best, theoretical_speedup(alpha, k, cost, verify))
    return best


def measured_points(run: dict) -> list[dict]:
    points = []
    for name, method in run["summary"]["methods"].items():
        if method.get("alpha") is not None and method.get("draft_to_target_latency") is not None:
            points.append({"method": name, "alpha": method["alpha"], "cost": method["draft_to_target_latency"],
                           "speedup": method["speedup"].get("median"), "theoretical": method.get("theoretical_speedup")})
    return points


def surface_plot(run: dict, out: Path) -> dict:
    curve = run["summary"].get("verify_cost_curve")
    points = measured_points(run)
    alphas, costs = np.linspace(0.0, 0.95, 60), np.linspace(0.0, max([0.6] + [p["cost"] * 1.2 for p in points]), 50)
    figure, panels = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for axes, verify, title in ((panels[0], None, "flat verify (the seed's formula)"), (panels[1], curve, "this target's measured verify cost")):
        grid = np.array([[best_speedup(a, c, verify) for a in alphas] for c in costs])
        contours = axes.contourf(alphas, costs, grid, levels=[0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0], cmap="RdYlGn")
        axes.contour(alphas, costs, grid, levels=[1.0], colors="black", linewidths=1)
        for p in points:
            axes.scatter(p["alpha"], p["cost"], color="black", s=12)
            axes.annotate(f"{p['method']} {p['speedup']:.2f}x" if p["speedup"] else p["method"], (p["alpha"], p["cost"]), fontsize=6)
        axes.set_xlabel("alpha (per-token acceptance)")
        axes.set_title(title, fontsize=9)
    panels[0].set_ylabel("c (draft forward / target forward)")
    figure.colorbar(contours, ax=panels, label="predicted speedup at the best K")
    figure.savefig(out / "speedup_surface.png", dpi=110)
    plt.close(figure)
    return {"verify_cost_curve": curve, "points": points}


def temperature_plot(runs: list[dict], out: Path) -> dict:
    series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: r["temperature"]):
        for name, method in run["summary"]["methods"].items():
            if method.get("acceptance_rate") is not None:
                series[name].append((run["temperature"], method["acceptance_rate"], method["tokens_per_target_forward"]))
    series = {name: values for name, values in series.items() if len(values) > 1 or len(runs) == 1}  # methods every run measured
    figure, panels = plt.subplots(1, 2, figsize=(12, 4))
    for name, values in series.items():
        panels[0].plot([t for t, _, _ in values], [a for _, a, _ in values], marker="o", label=name)
        panels[1].plot([t for t, _, _ in values], [n for _, _, n in values], marker="o", label=name)
    panels[0].set_ylabel("acceptance rate")
    panels[1].set_ylabel("tokens per target forward")
    for axes in panels:
        axes.set_xlabel("temperature")
    panels[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(out / "acceptance_vs_temperature.png", dpi=110)
    plt.close(figure)
    return {name: [{"temperature": t, "acceptance_rate": a, "tokens_per_target_forward": n} for t, a, n in values] for name, values in series.items()}


def per_task(run: dict) -> list[dict]:
    """Per seed task and method: the median per-prompt speedup over the matching categories."""
    baseline = {r["question_id"]: r for r in run["records"] if r["method"] == TARGET_ONLY}
    rows = []
    for task, (claim, categories) in SEED_CLAIMS.items():
        by_method: dict[str, list[dict]] = defaultdict(list)
        for r in run["records"]:
            if r["k"] and r["category"] in categories and r["question_id"] in baseline:
                by_method[r["method"]].append(r)
        measured = {}
        for method, records in sorted(by_method.items()):
            speedups = [r["tokens_per_second"] / baseline[r["question_id"]]["tokens_per_second"] for r in records]
            passes = sum(r["target_forward_passes"] for r in records)
            measured[method] = {"speedup": statistics.median(speedups), "prompts": len(records),
                                "tokens_per_target_forward": sum(r["tokens_per_target_forward"] * r["target_forward_passes"] for r in records) / passes}
        rows.append({"task": task, "claim": claim, "categories": categories, "measured": measured})
    return rows


def claims_markdown(rows: list[dict], temperature: float) -> str:
    lines = [f"Seed claims beside measured speedups (temperature {temperature:g}; median per-prompt speedup over target-only, "
             "tokens per target forward in brackets; best method first).", "",
             "| task (seed) | seed's claim | Spec-Bench categories | best measured | all methods |", "|---|---|---|---|---|"]
    for row in rows:
        ranked = sorted(row["measured"].items(), key=lambda item: -item[1]["speedup"])
        cells = "; ".join(f"{m} {v['speedup']:.2f}x ({v['tokens_per_target_forward']:.2f})" for m, v in ranked)
        best = f"{ranked[0][1]['speedup']:.2f}x ({ranked[0][0]})" if ranked else "-"
        low, high = row["claim"]
        lines.append(f"| {row['task']} | {low:g}-{high:g}x | {', '.join(row['categories'])} | {best} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seed_analysis", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="comma-separated benchmark output directories; the first one's temperature gives the surface and the table")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = [load_run(Path(d)) for d in args.runs.split(",") if d]
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = per_task(runs[0])
    analysis = {"runs": [r["directory"] for r in runs], "surface": surface_plot(runs[0], args.out),
                "temperature": temperature_plot(runs, args.out), "seed_claims": tasks}
    (args.out / "analysis.json").write_text(json.dumps(analysis, indent=2) + "\n")
    (args.out / "seed_claims.md").write_text(claims_markdown(tasks, runs[0]["temperature"]))
    print(claims_markdown(tasks, runs[0]["temperature"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
