"""PNG plots of a benchmark summary: acceptance and speedup against K per drafter, measured against
theoretical speedup, and acceptance per draft position."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from bench.services import drafter_label  # noqa: E402


def _by_drafter(summary: dict, records: list[dict]) -> dict[str, list[tuple[int, str]]]:
    """drafter -> [(K, method name)] sorted by K, for the speculative service methods."""
    ks = {r["method"]: (r["drafter"], r["k"]) for r in records if r["k"]}
    grouped: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for method, (drafter, k) in ks.items():
        if method in summary["methods"]:
            grouped[drafter_label(drafter)].append((k, method))
    return {d: sorted(items) for d, items in grouped.items()}


def write_plots(out_dir: Path, summary: dict, records: list[dict]) -> list[Path]:
    methods = summary["methods"]
    drafters = _by_drafter(summary, records)
    written = []

    def save(figure, name: str) -> None:
        path = out_dir / name
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    for metric, label, name in (("acceptance_rate", "acceptance rate", "acceptance_vs_k.png"), ("speedup", "speedup over target-only (median)", "speedup_vs_k.png")):
        figure, axes = plt.subplots(figsize=(6, 4))
        for drafter, items in drafters.items():
            values = [methods[m][metric]["median"] if metric == "speedup" else methods[m].get(metric) for _, m in items]
            axes.plot([k for k, _ in items], values, marker="o", label=drafter)
        if metric == "speedup":
            axes.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="target-only")
            for method, values in methods.items():
                if method.startswith("hf-") and values["speedup"]:
                    axes.axhline(values["speedup"]["median"], linestyle=":", linewidth=1, label=method, color="C7" if method == "hf-generate" else None)
        axes.set_xlabel("K (draft tokens per round)")
        axes.set_ylabel(label)
        axes.legend(fontsize=7)
        save(figure, name)

    figure, axes = plt.subplots(figsize=(5, 5))
    points = [(m["theoretical_speedup"], m["speedup"]["median"], name) for name, m in methods.items() if m.get("theoretical_speedup")]
    for theory, measured, name in points:
        axes.scatter(theory, measured)
        axes.annotate(name, (theory, measured), fontsize=6)
    if points:
        top = max(max(t, m) for t, m, _ in points) * 1.1
        axes.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel("theoretical speedup (verify-cost corrected)")
    axes.set_ylabel("measured speedup (median)")
    save(figure, "measured_vs_theoretical.png")

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, m in methods.items():
        if m.get("accepted_per_position"):
            axes.plot(range(1, len(m["accepted_per_position"]) + 1), m["accepted_per_position"], marker="o", label=name)
    axes.set_xlabel("draft position")
    axes.set_ylabel("accepted per round")
    axes.legend(fontsize=7)
    save(figure, "acceptance_per_position.png")
    return written
