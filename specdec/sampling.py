"""The math of speculative sampling, as pure functions over tensors.

No gRPC, no models, no state: processing logits (logit bias and penalties, which depend on the
tokens before each position) and warping them into the distributions p (target) and q (draft),
drawing tokens from a distribution with a given uniform number, and the rejection sampler that turns
K draft tokens into *accepted* tokens plus one *recovered* or *bonus* token.

Randomness comes in as uniform numbers, never from a global generator: the orchestrator owns one
`torch.Generator` per request and sends the uniforms with each call, so a seeded request draws the
same numbers wherever the math runs.

Exactness (Leviathan et al. 2023; Chen et al. 2023): for any draft distribution q, accepting draft
token x with probability min(1, p(x)/q(x)) and otherwise drawing from norm(max(p - q, 0)) yields
tokens distributed exactly as p. q may be truncated to any support (it only has to be the
distribution the draft token was really drawn from), and a deterministic draft is the point mass q.

Seed-stable sampling (`SamplingParams.position_seed`) draws without uniforms: the token at position
t is argmax(log p_t + g_t), with Gumbel noise g_t a function of the seed and t alone
(`position_noise`). The draft drafts with the same noise (so it agrees more often) and the target
accepts a draft token exactly when it equals its own choice, committing its choice at the first
mismatch. Every token is then a Gumbel-max draw from the target's p with fresh noise for its
position, so the output has the target's distribution and is the same whatever K, drafter, batch
or deployment produced it.

`rejection_sample` is the fast, batched path; `reference_rejection_sample` is a slow, scalar
implementation that follows the definition line by line and is the oracle for the fast one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn: the logits are processed (`process_logits`: logit bias, then the
    penalties), then warped (`warp`: temperature, top-k, top-p, min-p). temperature == 0 means
    greedy: the argmax of the processed logits."""

    temperature: float = 0.0
    top_k: int = 0  # 0: disabled
    top_p: float = 1.0  # 1.0: disabled
    min_p: float = 0.0  # keep tokens whose probability is at least min_p x the largest; 0: disabled
    # CTRL's (Hugging Face's): a seen token's logit is divided by it when positive, multiplied when
    # negative; every token of prompt and output counts. 1.0: disabled.
    repetition_penalty: float = 1.0
    # OpenAI's: subtracted from an output token's logit once (presence) and per occurrence (frequency);
    # only tokens of the output count, as in vLLM.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), ids ascending
    # The tokens that end an output (EOS, stop token ids) are forbidden while it holds fewer than
    # min_tokens tokens.
    min_tokens: int = 0
    end_token_ids: tuple[int, ...] = ()
    # Seed-stable sampling: each draw is the Gumbel-max choice with noise of (position_seed, its
    # position in the sequence) (`position_noise`), so the output depends on the seed alone.
    position_seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def position_keyed(self) -> bool:
        """Sampling with position-keyed noise (seed-stable)."""
        return self.position_seed is not None and not self.greedy

    @property
    def deterministic(self) -> bool:
        """Whether each token is a function of the sequence before it (greedy or seed-stable):
        then drafts are point masses and no uniform numbers travel."""
        return self.greedy or self.position_seed is not None

    @property
    def processes_logits(self) -> bool:
        """Whether the logits change before warping (and then depend on the sequence so far)."""
        return bool(self.logit_bias) or self.penalized or (self.min_tokens > 0 and bool(self.end_token_ids))

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


GREEDY = SamplingParams()


@dataclass(frozen=True)
class History:
    """The tokens before the first position whose logits are processed: the prompt's, then the
    output's so far (penalties count them differently)."""

    prompt: Sequence[int]
    output: Sequence[int]


def process_logits(logits: torch.Tensor, params: SamplingParams, history: History, drafts: Sequence[int] = ()) -> torch.Tensor:
    """Logits with the logit bias added, the repetition, frequency and presence penalties applied
    (vLLM's order) and the end tokens forbidden before min_tokens, position by position: row j
    follows history and drafts[:j], so a draft token counts for the rows after it.

    logits: [N, V] with N <= len(drafts) + 1 -> [N, V] float32 (a new tensor).
    """
    logits = logits.float().clone()
    rows, vocab = logits.shape
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        logits[:, list(ids)] += torch.tensor(bias)
    short = max(0, min(rows, params.min_tokens - len(history.output)))  # rows whose output is still too short
    if short and params.end_token_ids:
        logits[:short, list(params.end_token_ids)] = float("-inf")
    if not params.penalized:
        return logits
    counts = torch.bincount(torch.tensor(list(history.output), dtype=torch.long), minlength=vocab).float().expand(rows, vocab)  # [N, V]
    if rows > 1:
        drafted = torch.nn.functional.one_hot(torch.tensor(list(drafts[: rows - 1]), dtype=torch.long), vocab).float()  # [N-1, V]
        counts = counts + torch.cat([torch.zeros(1, vocab), drafted.cumsum(0)])  # row j counts drafts[:j]
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        seen[:, torch.tensor(list(history.prompt), dtype=torch.long)] = True
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Warped probabilities: temperature, then top-k, then top-p, then min-p (Hugging Face's order).

    logits: [..., V] -> probs: [..., V] in float32, zero outside the kept support. Greedy is the
    point mass on the argmax (first index on ties, like torch.argmax).
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth_largest = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # [..., V]
        # Keep a token while the mass of the more probable ones is below top_p; the first one is
        # always kept.
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


_MASK64 = (1 << 64) - 1


def _position_key(seed: int, position: int) -> int:
    """A 64-bit generator seed per (seed, position): splitmix64's finalizer over both, so that
    neighbouring positions and seeds get unrelated streams."""
    x = (seed + 0x9E3779B97F4A7C15 * (position + 1)) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_noise(seed: int, positions: Sequence[int], vocab: int) -> torch.Tensor:
    """Standard Gumbel noise of the given sequence positions: [N, V] float64, a function of
    (seed, position) alone, so every service and every round computes the same for a position.
    float64 uniforms: a float32 one would be 0 for some token of a 49k vocabulary once in a few
    hundred rows, forbidding it there."""
    rows = []
    for position in positions:
        generator = torch.Generator().manual_seed(_position_key(seed, position))
        uniforms = torch.rand(vocab, generator=generator, dtype=torch.float64).clamp_(min=1e-300)
        rows.append(-torch.log(-torch.log(uniforms)))
    return torch.stack(rows)


def gumbel_scores(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """log p + Gumbel noise, [..., V] float64: its argmax is a draw from p (the Gumbel-max trick),
    never a zero-probability token."""
    return probs.double().log() + noise


def sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: the token whose CDF interval holds uniform * total mass.

    probs: [..., V] (need not be normalized), uniforms: [...] in [0, 1) -> tokens: [...] int64.
    Zero-probability tokens are never drawn.
    """
    cdf = probs.float().cumsum(-1)  # [..., V]
    threshold = (uniforms.float() * cdf[..., -1]).unsqueeze(-1)  # [..., 1]
    tokens = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)
    return tokens.clamp_(max=probs.shape[-1] - 1)


def truncate_to_support(probs: torch.Tensor, max_support: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `max_support` most probable tokens of each row, renormalized.

    probs: [N, V] -> (token_ids: [N, S] int64, probs: [N, S] float32), S = min(max_support, V).
    Tokens with zero probability stay in the support with probability 0.
    """
    support = min(max_support, probs.shape[-1])
    top_probs, top_ids = torch.topk(probs.float(), support, dim=-1)
    return top_ids, top_probs / top_probs.sum(-1, keepdim=True)


def densify(token_ids: torch.Tensor, probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Sparse rows (token_ids, probs: [N, S]) -> dense [N, V] distributions."""
    dense = torch.zeros(token_ids.shape[0], vocab_size, dtype=torch.float32)
    return dense.scatter_(-1, token_ids.long(), probs.float())


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one sequence's drafts."""

    accepted: int  # length of the accepted prefix of the draft tokens
    next_token: int  # recovered token (a draft was rejected) or bonus token (all accepted)
    # messages.Features the target returns with it for sessions that feed a feature drafter
    features: object = None
    # messages.Logprobs of the committed tokens, when the work asked for them
    logprobs: object = None
    # a tree's accepted nodes, root's child first (accepted of them); None for a chain
    path: tuple[int, ...] | None = None


def rejection_sample(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    uniforms: torch.Tensor,
) -> list[Verdict]:
    """Batched speculative verification.

    target_probs: [B, K+1, V] warped p at each draft position and the bonus position.
    draft_tokens: [B, K] int.
    draft_probs:  [B, K, V] warped q, or None when every draft token is a point mass.
    uniforms:     [B, K+1] in [0, 1): K acceptance tests, then one draw of the next token.
    """
    batch, k_plus_1, _ = target_probs.shape
    k = k_plus_1 - 1
    rows = torch.arange(batch).unsqueeze(1)  # [B, 1]
    positions = torch.arange(k).unsqueeze(0)  # [1, K]
    p_draft = target_probs[rows, positions, draft_tokens]  # [B, K]
    q_draft = torch.ones_like(p_draft) if draft_probs is None else draft_probs[rows, positions, draft_tokens]
    # Accept x with probability min(1, p/q): u < p/q, written without dividing by q.
    accept = uniforms[:, :k] * q_draft < p_draft  # [B, K]
    accepted = accept.int().cumprod(-1).sum(-1)  # [B]: length of the all-true prefix

    last = torch.minimum(accepted, torch.tensor(k))  # [B] position of the next-token draw
    p_next = target_probs[torch.arange(batch), last]  # [B, V]
    if k > 0:
        if draft_probs is None:
            q_all = torch.nn.functional.one_hot(draft_tokens.long(), target_probs.shape[-1]).float()
        else:
            q_all = draft_probs
        q_at_last = torch.cat([q_all, torch.zeros_like(p_next).unsqueeze(1)], dim=1)[torch.arange(batch), last]
        residual = (p_next - q_at_last).clamp_(min=0.0)  # [B, V]; q is zero at the bonus position
        # A rejection implies p(x) < q(x), so the residual has mass; only rounding can empty it.
        empty = residual.sum(-1, keepdim=True) <= 0
        p_next = torch.where(empty, p_next, residual)
    next_tokens = sample(p_next, uniforms[:, k])  # [B]
    return [Verdict(int(a), int(t)) for a, t in zip(accepted.tolist(), next_tokens.tolist())]


def argmax(scores: torch.Tensor) -> torch.Tensor:
    """torch.argmax over the last dimension (the first index on ties, NaN the largest), through
    NumPy for float CPU tensors: at a 49k vocabulary torch's kernel takes ~45 us, NumPy's ~4 us,
    once or more in every round."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        return torch.as_tensor(scores.numpy().argmax(-1))
    return scores.argmax(-1)


def greedy_verify(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> list[Verdict]:
    """Greedy verification without building distributions: accept while draft == argmax.

    target_logits: [B, K+1, V], draft_tokens: [B, K]. Equals rejection_sample with p = warp(GREEDY).
    A few rows: plain Python beats five small tensor operations.
    """
    verdicts = []
    for best, drafts in zip(argmax(target_logits).tolist(), draft_tokens.tolist()):  # [K+1], [K]
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == best[accepted]:
            accepted += 1
        verdicts.append(Verdict(accepted, best[accepted]))
    return verdicts


def reference_rejection_sample(
    target_probs: torch.Tensor,
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None,
    uniforms: list[float],
) -> Verdict:
    """The definition, one position at a time, for one sequence. Slow; the oracle in tests.

    target_probs: [K+1, V]; draft_probs: [K, V] or None (point masses).
    """
    for position, token in enumerate(draft_tokens):
        p = float(target_probs[position, token])
        q = 1.0 if draft_probs is None else float(draft_probs[position, token])
        if uniforms[position] < min(1.0, p / q):
            continue
        residual = [0.0] * target_probs.shape[-1]
        for other in range(target_probs.shape[-1]):
            q_other = (other == token) * 1.0 if draft_probs is None else float(draft_probs[position, other])
            residual[other] = max(float(target_probs[position, other]) - q_other, 0.0)
        if sum(residual) <= 0:
            residual = target_probs[position].tolist()
        return Verdict(position, reference_draw(residual, uniforms[len(draft_tokens)]))
    bonus = target_probs[len(draft_tokens)].tolist()
    return Verdict(len(draft_tokens), reference_draw(bonus, uniforms[len(draft_tokens)]))


def reference_draw(weights: list[float], uniform: float) -> int:
    threshold = uniform * sum(weights)
    cumulative = 0.0
    for token, weight in enumerate(weights):
        cumulative += weight
        if weight > 0 and threshold < cumulative:
            return token
    return max(t for t, w in enumerate(weights) if w > 0)
