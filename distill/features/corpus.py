"""The feature corpus: the target's greedy responses together with its hidden states.

A feature drafter learns to predict the target's next feature from its current one, so it trains on
the target's own outputs and the features the target computed while writing them: one pass does
both. Generation batches continuously (a finished row's place goes to the next prompt, whose
prefill joins the running rows' steps in the same packed forward pass, see `lean_llama`), and
keeps, per example, the features of every token it fed: prompt and response but the last token,
[prompt + response - 1, width].

On disk: `examples.jsonl` (one record per example: ids and where its features are) and shards
`shard-*.safetensors` of bfloat16 rows. A shard is written before its records, so an interrupted
run loses at most the examples in flight; a rerun skips the keys already recorded.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distill.prompts import Prompt
from specdec.lm import SequenceCache

EXAMPLES_FILE = "examples.jsonl"


@dataclass
class FeatureExample:
    key: str
    source: str
    split: str
    prompt_ids: list[int]
    response_ids: list[int]  # greedy; ends with an EOS id unless cut by max_new_tokens
    shard: str  # file name of the shard holding its features
    offset: int  # first row of its features in the shard

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


class FeatureStore:
    """Examples and their feature rows in one directory (see the module docstring)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._open: dict[str, object] = {}

    def examples(self) -> list[FeatureExample]:
        path = self.directory / EXAMPLES_FILE
        if not path.exists():
            return []
        with path.open() as lines:
            return [FeatureExample(**json.loads(line)) for line in lines if line.strip()]

    def features(self, example: FeatureExample) -> torch.Tensor:
        """[len(ids) - 1, width] bfloat16: row t is the target's feature after reading ids[: t + 1]."""
        if example.shard not in self._open:
            self._open[example.shard] = safe_open(str(self.directory / example.shard), "pt")
        rows = len(example.ids) - 1
        return self._open[example.shard].get_slice("features")[example.offset : example.offset + rows]

    def append(self, finished: list[tuple[FeatureExample, torch.Tensor]]) -> None:
        """Write one shard with the examples' features, then their records."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"shard-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.safetensors"
        offset, records = 0, []
        for example, rows in finished:
            example.shard, example.offset = name, offset
            offset += rows.shape[0]
            records.append(json.dumps(asdict(example)))
        save_file({"features": torch.cat([rows for _, rows in finished]).to(torch.bfloat16).contiguous()}, str(self.directory / name))
        with (self.directory / EXAMPLES_FILE).open("a") as out:
            out.write("".join(record + "\n" for record in records))


@dataclass
class _Row:
    prompt: Prompt
    prompt_ids: list[int]
    cache: SequenceCache = field(default_factory=SequenceCache)
    feed: list[int] = field(default_factory=list)
    response: list[int] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)


@torch.inference_mode()
def generate(
    target,  # a forward path, lm.path_for
    encoded: list[tuple[Prompt, list[int]]],
    store: FeatureStore,
    eos_ids: tuple[int, ...],
    layers: tuple[int, ...] = (-1,),
    batch_size: int = 48,
    max_new_tokens: int = 256,
    shard_examples: int = 256,
    deadline: float = float("inf"),
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Answer every (prompt, prompt ids) whose key `store` lacks, greedily, keeping the features of
    `layers`; stops admitting prompts at `deadline` (time.monotonic()). Returns the examples added."""
    done = {e.key for e in store.examples()}
    queue = [(p, ids) for p, ids in encoded if p.key not in done]
    total, added, active, finished = len(queue), 0, [], []
    while queue or active:
        while queue and len(active) < batch_size and time.monotonic() < deadline:
            prompt, ids = queue.pop(0)
            active.append(_Row(prompt, ids, feed=list(ids)))
        if not active:
            break
        logits, features = target.forward([r.cache for r in active], [r.feed for r in active], logits_for_last=1, features=layers)
        still = []
        for row, row_logits, row_features in zip(active, logits, features):
            row.features.append(row_features)
            token = int(row_logits[-1].argmax())
            row.response.append(token)
            row.feed = [token]
            if token in eos_ids or len(row.response) >= max_new_tokens:
                p = row.prompt
                example = FeatureExample(p.key, p.source, p.split, row.prompt_ids, row.response, "", 0)
                finished.append((example, torch.cat(row.features)))  # [prompt + response - 1, width]
            else:
                still.append(row)
        active = still
        if len(finished) >= shard_examples or (finished and not active):
            store.append(finished)
            added += len(finished)
            finished = []
            if progress:
                progress(added, total)
    return added
