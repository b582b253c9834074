"""The speedup speculative decoding should give, from what was measured.

Leviathan et al. (2023): with per-token acceptance probability alpha, K drafts per round and a
draft forward costing c target forwards, a round yields (1 - alpha^(K+1)) / (1 - alpha) tokens for
K c + 1 target-forward times. That 1 assumes scoring K + 1 tokens costs what scoring one does,
true on a GPU with headroom, false on a CPU: the correction replaces it by v(K+1) = T(K+1) / T(1),
the target's measured verify cost curve. alpha comes from the measured tokens per target forward
(inverting the first expression), c from the measured draft and target-only forward times.
"""

from __future__ import annotations

import statistics
import time

import torch

from specdec import lm
from specdec.models import LoadedModel


def verify_cost_curve(target: LoadedModel, max_tokens: int, context: int = 256, repeats: int = 9) -> list[float]:
    """[T(1)/T(1), T(2)/T(1), ..., T(max_tokens)/T(1)]: median time to score n new tokens after a
    `context`-token prefix, through the same single-sequence path the target service uses."""
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, target.vocab_size, (context,), generator=generator).tolist()
    cache = lm.SequenceCache()
    lm.forward(target.model, [cache], [prefix], logits_for_last=1)
    medians = []
    for n in range(1, max_tokens + 1):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            lm.forward(target.model, [cache], [prefix[:n]])
            times.append(time.perf_counter() - started)
            cache.truncate(context)
        medians.append(statistics.median(times))
    return [t / medians[0] for t in medians]


def expected_tokens_per_round(alpha: float, k: int) -> float:
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def alpha_from_tokens_per_forward(tokens_per_forward: float, k: int) -> float:
    """The alpha whose expected tokens per round equals the measured value (bisection)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if expected_tokens_per_round(middle, k) < tokens_per_forward:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def theoretical_speedup(alpha: float, k: int, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """Expected speedup over target-only decoding; verify_cost = T(K+1)/T(1) (1 = the paper's)."""
    return expected_tokens_per_round(alpha, k) / (k * cost_ratio + verify_cost)
