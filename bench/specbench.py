"""Prompts in Spec-Bench's JSONL format ({question_id, category, turns}); the first turn of each is
sent as one user chat message."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# Where the benchmarks read prompts unless --prompts says otherwise (e.g. Spec-Bench's dev split:
# SPECDEC_PROMPTS=../shared/data/specbench_dev.jsonl); never a path outside the repository by itself.
PROMPTS_VARIABLE = "SPECDEC_PROMPTS"
SHIPPED = Path(__file__).resolve().parent / "prompts" / "specbench_sample.jsonl"


@dataclass(frozen=True)
class BenchPrompt:
    question_id: int
    category: str
    text: str


def default_prompts() -> Path:
    """$SPECDEC_PROMPTS when set, else the 13 prompts shipped in bench/prompts/."""
    return Path(os.environ[PROMPTS_VARIABLE]) if os.environ.get(PROMPTS_VARIABLE) else SHIPPED


def load_prompts(path: Path, limit: int | None = None, per_category: int | None = None) -> list[BenchPrompt]:
    """The file's prompts in order; `per_category` keeps the first N of each category, `limit` the
    first N overall (after that)."""
    prompts, seen = [], {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        seen[row["category"]] = seen.get(row["category"], 0) + 1
        if per_category and seen[row["category"]] > per_category:
            continue
        prompts.append(BenchPrompt(int(row["question_id"]), row["category"], row["turns"][0]))
    return prompts[:limit] if limit else prompts
