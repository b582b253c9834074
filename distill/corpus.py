"""The distillation corpus: the target's own responses to the training prompts.

A draft is only ever asked to predict what the target is about to write, so it learns from the
target's outputs (DistillSpec's on-policy-ish data), not from the datasets' reference answers.
Records are appended to a JSONL file one batch at a time; a restarted run skips the prompts already
answered, so generation resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from distill.prompts import Prompt
from specdec.chat import chat_token_ids
from specdec.models import LoadedModel

GREEDY, SAMPLED = "greedy", "sampled"


@dataclass
class Example:
    key: str
    source: str
    split: str
    mode: str  # GREEDY (what greedy speculation sees) or SAMPLED (more of the target's distribution)
    prompt_ids: list[int]
    response_ids: list[int]  # ends with an EOS id unless cut by max_new_tokens

    @property
    def record_key(self) -> str:
        return f"{self.key}#{self.mode}"


def read_corpus(path: Path) -> list[Example]:
    if not path.exists():
        return []
    with path.open() as lines:
        return [Example(**json.loads(line)) for line in lines if line.strip()]


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [B, width]
    mask = torch.zeros(len(rows), width, dtype=torch.long)  # [B, width]
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def cut_at_eos(tokens: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    """Tokens up to and including the first EOS (the draft must learn to propose EOS too)."""
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: index + 1]
    return tokens


@torch.inference_mode()
def generate_corpus(
    target: LoadedModel,
    prompts: list[Prompt],
    path: Path,
    mode: str,
    batch_size: int,
    max_new_tokens: int,
    max_prompt_tokens: int,
    temperature: float = 0.8,
    seed: int = 0,
    deadline: float = float("inf"),
    progress: Callable[[int, int], None] | None = None,
) -> list[Example]:
    """Answer every prompt not yet in `path` (greedy or sampled), appending records as batches
    finish; stops early at `deadline` (time.monotonic()). Returns the new examples."""
    done = {e.record_key for e in read_corpus(path)}
    encoded = [(p, chat_token_ids(target.tokenizer, [{"role": "user", "content": p.text}])) for p in prompts]
    todo = [(p, ids) for p, ids in encoded if f"{p.key}#{mode}" not in done and len(ids) <= max_prompt_tokens]
    todo.sort(key=lambda item: len(item[1]))  # similar lengths per batch: less padding
    pad = target.eos_token_ids[0]
    new: list[Example] = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        for start in range(0, len(todo), batch_size):
            if time.monotonic() > deadline:
                break
            batch = todo[start : start + batch_size]
            ids, mask = _left_padded([ids for _, ids in batch], pad)
            torch.manual_seed(seed + start)
            sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if mode == SAMPLED else dict(do_sample=False)
            output = target.model.generate(
                input_ids=ids.to(target.device),
                attention_mask=mask.to(target.device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=list(target.eos_token_ids),
                **sampling,
            )  # [B, width + new]
            for (prompt, prompt_ids), row in zip(batch, output[:, ids.shape[1] :].tolist()):
                example = Example(prompt.key, prompt.source, prompt.split, mode, prompt_ids, cut_at_eos(row, target.eos_token_ids))
                out.write(json.dumps(asdict(example)) + "\n")
                new.append(example)
            out.flush()
            if progress:
                progress(min(start + batch_size, len(todo)), len(todo))
    return new
