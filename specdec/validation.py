"""Checks on request values shared by the services; each failure names the field at fault."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from specdec.errors import InvalidArgument
from specdec.sampling import SamplingParams


MAX_LOGIT_BIAS = 1024  # entries of a logit_bias map


def sampling_params(
    temperature: float, top_k: int, top_p: float, prefix: str = "", *, vocab_size: int = 0, min_p: float = 0.0,
    repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None, position_seed: int | None = None, min_tokens: int = 0,
    end_token_ids: tuple[int, ...] = (),
) -> SamplingParams:
    """Validated SamplingParams (logit_bias and end token ids in [0, vocab_size); any id >= 0 when
    it is 0)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"temperature must be a finite number >= 0, got {temperature}", prefix + "temperature")
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0, got {top_k}", prefix + "top_k")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}", prefix + "top_p")
    if not math.isfinite(min_p) or not 0 <= min_p <= 1:
        raise InvalidArgument(f"min_p must be in [0, 1], got {min_p}", prefix + "min_p")
    if not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise InvalidArgument(f"repetition_penalty must be a finite number > 0, got {repetition_penalty}", prefix + "repetition_penalty")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not math.isfinite(value) or not -2 <= value <= 2:
            raise InvalidArgument(f"{name} must be in [-2, 2], got {value}", prefix + name)
    logit_bias = dict(logit_bias or {})
    if len(logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidArgument(f"at most {MAX_LOGIT_BIAS} entries, got {len(logit_bias)}", prefix + "logit_bias")
    for token, bias in logit_bias.items():
        if not math.isfinite(bias) or not -100 <= bias <= 100:
            raise InvalidArgument(f"the bias of token {token} must be in [-100, 100], got {bias}", prefix + "logit_bias")
    params = SamplingParams(
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), min_p=float(min_p),
        repetition_penalty=float(repetition_penalty), presence_penalty=float(presence_penalty),
        frequency_penalty=float(frequency_penalty), logit_bias=tuple(sorted((int(t), float(b)) for t, b in logit_bias.items())),
        position_seed=position_seed, min_tokens=int(min_tokens), end_token_ids=tuple(end_token_ids),
    )
    if min_tokens < 0:
        raise InvalidArgument(f"min_tokens must be >= 0, got {min_tokens}", prefix + "min_tokens")
    sampling_token_ids(params, vocab_size, prefix)
    if position_seed is not None and not 0 <= position_seed < 1 << 64:
        raise InvalidArgument(f"the seed must be in [0, 2^64), got {position_seed}", prefix + "position_seed")
    return params


def sampling_token_ids(params: SamplingParams, vocab_size: int, prefix: str) -> None:
    """Every logit_bias and end token id in [0, vocab_size) (any id >= 0 when vocab_size is 0:
    unknown); the fields are named after `prefix`."""
    token_ids([t for t, _ in params.logit_bias], vocab_size, prefix + "logit_bias", allow_empty=True)
    token_ids(params.end_token_ids, vocab_size, prefix + "end_token_ids", allow_empty=True)


MAX_TOP_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's limit)


def logprobs(value: int | None, field: str) -> int | None:
    """The number of top alternatives asked for: None (no logprobs) or in [0, MAX_TOP_LOGPROBS]."""
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {value}", field)
    return value


def token_ids(ids: Iterable[int], vocab_size: int, field: str, allow_empty: bool = False) -> list[int]:
    """The ids as a list, each in [0, vocab_size) (any id >= 0 when vocab_size is 0: unknown)."""
    ids = list(ids)
    if not ids and not allow_empty:
        raise InvalidArgument("must hold at least one token id", field)
    for index, token in enumerate(ids):
        if token < 0 or (vocab_size and token >= vocab_size):
            raise InvalidArgument(f"token id {token} at index {index} is outside the vocabulary [0, {vocab_size})", field)
    return ids


def prompt_len(value: int, tokens: int, field: str) -> int:
    """The prompt's share of a session's first tokens: in [0, tokens], 0 meaning all of them."""
    if not 0 <= value <= tokens:
        raise InvalidArgument(f"prompt_len must be in [0, {tokens}] (the tokens given), got {value}", field)
    return value or tokens


def num_speculative_tokens(value: int, limit: int, field: str, minimum: int = 0) -> int:
    """K within [minimum, limit]: the limit is the service's own (ModelInfo.max_speculative_tokens),
    which the orchestrator caps every round at, so only a foreign client sees this error."""
    if not minimum <= value <= limit:
        raise InvalidArgument(f"{value} speculative tokens; this service takes {minimum} to {limit}", field)
    return value


def tree_shape(shape, depth: int, max_nodes: int, field: str) -> None:
    """A draft tree's shape (trees.TreeShape): branching entries >= 1, at most `max_nodes` nodes."""
    if any(width < 1 for width in shape.branching):
        raise InvalidArgument(f"every tree_branching entry must be at least 1, got {list(shape.branching)}", field)
    if shape.nodes(depth) > max_nodes:
        raise InvalidArgument(f"a tree of {shape.nodes(depth)} nodes; this service grows at most {max_nodes}", field)


def uniforms(values: Iterable[float], count: int, field: str) -> list[float]:
    """Exactly `count` numbers in [0, 1)."""
    values = list(values)
    if len(values) != count:
        raise InvalidArgument(f"expected {count} uniform numbers, got {len(values)}", field)
    for index, value in enumerate(values):
        if not 0 <= value < 1:  # also rejects NaN
            raise InvalidArgument(f"uniform number {value} at index {index} is outside [0, 1)", field)
    return values


def sparse_distributions(
    rows: list[tuple[torch.Tensor, torch.Tensor]], draft_tokens: list[int], vocab_size: int, field: str
) -> None:
    """One distribution per draft token, ids in the vocabulary, finite non-negative probabilities
    summing to 1, and the draft token itself in the support with probability > 0."""
    if len(rows) != len(draft_tokens):
        raise InvalidArgument(f"expected {len(draft_tokens)} distributions, one per draft token, got {len(rows)}", field)
    for position, ((ids, probs), token) in enumerate(zip(rows, draft_tokens)):
        where = f"{field}[{position}]"
        if ids.shape != probs.shape or ids.numel() == 0:
            raise InvalidArgument("token_ids and probs must be non-empty and of equal length", where)
        if bool((ids < 0).any()) or bool((ids >= vocab_size).any()):
            raise InvalidArgument(f"a token id is outside the vocabulary [0, {vocab_size})", where + ".token_ids")
        if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
            raise InvalidArgument("probabilities must be finite and >= 0", where + ".probs")
        if abs(float(probs.sum()) - 1.0) > 1e-3:
            raise InvalidArgument(f"probabilities sum to {float(probs.sum()):.6f}, not 1", where + ".probs")
        if len(set(ids.tolist())) != ids.numel():
            raise InvalidArgument("token ids repeat", where + ".token_ids")
        if float(probs[ids == token].sum()) <= 0:
            raise InvalidArgument(f"draft token {token} has no probability in its own distribution", where)


def distinct_sessions(session_ids: list[str], field: str) -> None:
    """A batch may name each session once: two items of one session cannot be scored together."""
    seen: set[str] = set()
    for index, session_id in enumerate(session_ids):
        if session_id in seen:
            raise InvalidArgument(f"session {session_id!r} appears twice in one batch", f"{field}[{index}].session_id")
        seen.add(session_id)
