"""The seed's analysis (bench/seed_analysis.py) from benchmark runs: the formula at its best K,
per-task speedups paired with target-only on the same prompts, and every file written."""

from __future__ import annotations

import json

import pytest

from bench import seed_analysis
from bench.services import TARGET_ONLY


def record(question_id, category, method, k, tokens_per_second, tokens_per_target_forward=1.0, passes=10):
    return {"question_id": question_id, "category": category, "method": method, "k": k, "tokens_per_second": tokens_per_second,
            "tokens_per_target_forward": tokens_per_target_forward, "target_forward_passes": passes}


def write_run(directory, temperature, acceptance):
    directory.mkdir()
    records = [
        record(1, "coding", TARGET_ONLY, 0, 10.0), record(1, "coding", "l6 K=4", 4, 25.0, 3.0, 5),
        record(2, "coding", TARGET_ONLY, 0, 20.0), record(2, "coding", "l6 K=4", 4, 30.0, 2.0, 10),
        record(3, "stem", TARGET_ONLY, 0, 10.0), record(3, "stem", "l6 K=4", 4, 8.0, 1.2, 10),
        record(4, "translation", TARGET_ONLY, 0, 10.0), record(4, "translation", "l6 K=4", 4, 99.0, 5.0, 10),
    ]
    summary = {"settings": {"temperature": str(temperature)}, "verify_cost_curve": [1.0, 1.3, 1.6, 1.9, 2.2],
               "methods": {TARGET_ONLY: {"speedup": {"median": 1.0}},
                           "l6 K=4": {"speedup": {"median": 1.5}, "alpha": 0.6, "draft_to_target_latency": 0.1, "theoretical_speedup": 1.4,
                                      "acceptance_rate": acceptance, "tokens_per_target_forward": 1 + 4 * acceptance}}}
    (directory / "summary.json").write_text(json.dumps(summary))
    (directory / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_formula_at_its_best_k():
    assert seed_analysis.best_speedup(0.5, 0.0, None) == pytest.approx((1 - 0.5**9) / 0.5)  # free drafts: the longest K
    assert seed_analysis.best_speedup(0.0, 0.3, None) == 1.0  # nothing accepted: K = 0
    steep = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]  # a verify that costs its tokens: never worth it
    assert seed_analysis.best_speedup(0.9, 0.0, steep) == pytest.approx(1.0)


def test_the_analysis_pairs_prompts_and_writes_its_files(tmp_path):
    write_run(tmp_path / "t0", 0.0, 0.5)
    write_run(tmp_path / "t1", 1.0, 0.3)
    out = tmp_path / "analysis"
    assert seed_analysis.main(["--runs", f"{tmp_path / 't0'},{tmp_path / 't1'}", "--out", str(out)]) == 0
    analysis = json.loads((out / "analysis.json").read_text())
    tasks = {row["task"]: row["measured"] for row in analysis["seed_claims"]}
    assert tasks["code generation"]["l6 K=4"]["speedup"] == pytest.approx(2.0)  # median of 2.5x and 1.5x
    assert tasks["code generation"]["l6 K=4"]["tokens_per_target_forward"] == pytest.approx((3.0 * 5 + 2.0 * 10) / 15)
    assert tasks["technical Q&A"]["l6 K=4"]["speedup"] == pytest.approx(0.8) and tasks["story writing"] == {}
    assert [p["temperature"] for p in analysis["temperature"]["l6 K=4"]] == [0.0, 1.0]
    assert analysis["surface"]["points"][0]["method"] == "l6 K=4"
    for name in ("speedup_surface.png", "acceptance_vs_temperature.png", "seed_claims.md"):
        assert (out / name).stat().st_size > 0
    assert "| code generation | 2.5-3.5x | coding | 2.00x (l6 K=4) |" in (out / "seed_claims.md").read_text()
