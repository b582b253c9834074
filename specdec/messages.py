"""Domain objects exchanged between the orchestrator and the model services.

They mirror the protobuf messages of protos/specdec/v1 (wire.py converts), so engines and the
generation loop work on plain Python and tensors, and the same loop runs against in-process
engines or remote services.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.sampling import SamplingParams
from specdec.trees import TreeShape

#: A distribution on a sparse support: token ids [S] (int32) and their probabilities [S] (float32).
SparseDistribution = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Features:
    """The target's hidden states at positions start .. start + len(rows) - 1 of one sequence
    (Features in common.proto): rows [n, width] bfloat16."""

    start: int
    rows: torch.Tensor

    @property
    def end(self) -> int:
        return self.start + len(self.rows)

    def after(self, position: int) -> "Features":
        """The rows from `position` on (position in [start, end))."""
        return self if position <= self.start else Features(position, self.rows[position - self.start :])

    @staticmethod
    def joined(parts: list["Features"]) -> "Features | None":
        """Consecutive parts as one (None for none)."""
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else Features(parts[0].start, torch.cat([p.rows for p in parts]))


@dataclass(frozen=True)
class Logprobs:
    """Log-probabilities under the target of consecutive committed tokens (Logprobs in
    target.proto): per token its own, and the top most probable tokens at its position."""

    logprobs: list[float]
    top_token_ids: list[list[int]]  # per token, most probable first
    top_logprobs: list[list[float]]

    def __getitem__(self, part: slice) -> "Logprobs":
        return Logprobs(self.logprobs[part], self.top_token_ids[part], self.top_logprobs[part])

    @staticmethod
    def joined(parts: list["Logprobs"]) -> "Logprobs | None":
        """The parts one after the other (None for none)."""
        if not parts:
            return None
        return Logprobs([v for p in parts for v in p.logprobs], [r for p in parts for r in p.top_token_ids],
                        [r for p in parts for r in p.top_logprobs])


@dataclass(frozen=True)
class VerifyWork:
    """One sequence of a Verify batch (VerifyItem in target.proto)."""

    session_id: str
    prefix_len: int
    tokens: list[int]
    draft_tokens: list[int]
    # One per draft token; None: each draft token is a point mass (greedy or n-gram drafts).
    draft_probs: list[SparseDistribution] | None
    sampling: SamplingParams
    uniforms: list[float]
    logprobs: int | None = None  # None: none; n: the committed tokens' and the n most probable
    warped_logprobs: bool = False  # from the warped p instead of log_softmax(logits)
    draft_parents: list[int] | None = None  # a tree (specdec/trees.py); None: a chain


@dataclass(frozen=True)
class ProposeWork:
    """One session of a Propose batch (ProposeItem in draft.proto)."""

    session_id: str
    prefix_len: int
    tokens: list[int]
    num_speculative_tokens: int
    sampling: SamplingParams
    uniforms: list[float]
    features: Features | None = None  # for feature drafters: the target's features it lacks
    tree: TreeShape | None = None  # propose a tree of this shape, num_speculative_tokens deep


@dataclass
class Proposal:
    """Draft tokens for one session and, when they were sampled, the distributions they came from."""

    tokens: list[int]
    distributions: list[SparseDistribution] | None = None
    parents: list[int] | None = None  # a tree's (specdec/trees.py); None: a chain


@dataclass(frozen=True)
class ModelInfo:
    model: str
    vocab_size: int
    vocab_fingerprint: str
    max_context: int
    eos_token_ids: tuple[int, ...]
    max_speculative_tokens: int
    active_sessions: int = 0
    cache_bytes: int = 0
    device: str = ""
    forward_cost: tuple[tuple[int, float], ...] = ()  # (tokens scored, seconds) per forward pass
    weight_format: str = ""
    weight_format_reason: str = ""
    feature_layers: tuple[int, ...] = ()  # a feature drafter's target layers
