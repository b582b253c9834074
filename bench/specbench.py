"""Prompts in Spec-Bench's JSONL format ({question_id, category, turns}); the first turn of each is
sent as one user chat message."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEV_SPLIT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "specbench_dev.jsonl"
SHIPPED = Path(__file__).resolve().parent / "prompts" / "specbench_sample.jsonl"


@dataclass(frozen=True)
class BenchPrompt:
    question_id: int
    category: str
    text: str


def default_prompts() -> Path:
    """The dev split beside the checkout when it is there, else the small set shipped here."""
    return DEV_SPLIT if DEV_SPLIT.exists() else SHIPPED


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
