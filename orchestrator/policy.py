"""K, the number of draft tokens each round verifies (`num_speculative_tokens` from the request to
the draft's engine): resolved once per request into a policy, a fixed K or K chosen per round from
what the orchestrator measures. Pure arithmetic over running estimates; no gRPC, no tensors.

Resolution (`KResolver.policy`): a request asks for K (`num_speculative_tokens`, at most the
orchestrator's `max_speculative_tokens`, else INVALID_ARGUMENT) or leaves it unset (the
orchestrator's `num_speculative_tokens`: every round, or with adaptive K the most per round). That K
is then capped by what both model services accept (their ModelInfo's `max_speculative_tokens`), so
that no round ever asks a service for more than it takes: a draft started with a smaller limit than
the target gets fewer tokens per round instead of refusing the call.

A round with K drafts costs the draft K token steps and the target one forward pass over the
tokens of every sequence in its batch. It yields E(K) = (1 - a^(K+1)) / (1 - a) tokens when each
draft token is accepted with probability a (the independence model of Leviathan et al., 2023).
When the target's batch holds B sequences and the others draft like this one, the batch's
throughput at K is

    B * E(K) / (draft(K) + T(B * (K + 1)))

where T(n) is the target's forward time for n tokens (its cost curve, measured by the target at
warm-up and reported in ModelInfo, rescaled by the times the rounds observe) and draft(K) the
draft's time. The adaptive policy picks the K in [0, K_max] that maximizes it, if that beats K = 0
by MIN_GAIN. Where T is nearly flat (a GPU), K grows with acceptance; where T grows with n (a
CPU, or any device once batches are large), K falls to 0 as batches grow and acceptance drops:
speculation switches itself off where it would cost throughput. A request at K = 0 still drafts one token now and then (after 16
rounds, then 32, ... 128 while nothing changes), so that acceptance can tell when speculation
pays again; but not while the load alone rules it out (not even a draft always accepted would
gain MIN_GAIN at the current batch size), since a probe costs the request's draft session its
prefill and the shared processor or device its time.

Exactness never depends on K: each round emits tokens distributed as the target's given the
sequence so far, for any K, and K is chosen from past rounds only.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from specdec.errors import InvalidArgument
from specdec.messages import ModelInfo

# Rounds at K = 0 before a single-token draft probes the acceptance again; the interval doubles
# while probes do not change the decision, up to MAX_PROBE_EVERY, since each probe costs a draft
# call and a wider verify.
PROBE_EVERY = 16
MAX_PROBE_EVERY = 128
# Speculate only where the model predicts at least this much more throughput than K = 0: what it
# leaves out (waiting for a drafting request to rejoin the batch, draft sessions' prefill, a draft
# sharing the target's processor) only ever costs, and measured under load on the 2-core dev
# machine, K chosen without a margin ran 7-22% below target-only.
MIN_GAIN = 1.1


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a round with k drafts yields when each is accepted with probability `acceptance`."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


class CostCurve:
    """T(n): seconds of one forward pass scoring n tokens, interpolated linearly between measured
    points and extended past the last one along the last segment's slope."""

    def __init__(self, points: tuple[tuple[int, float], ...]):
        ordered = sorted(points)
        self.tokens = [n for n, _ in ordered]
        self.seconds = [s for _, s in ordered]

    def __bool__(self) -> bool:
        return len(self.tokens) >= 2

    def __call__(self, n: float) -> float:
        i = min(max(bisect.bisect_left(self.tokens, n), 1), len(self.tokens) - 1)
        (n0, n1), (s0, s1) = self.tokens[i - 1 : i + 1], self.seconds[i - 1 : i + 1]
        return max(s0 + (s1 - s0) * (n - n0) / (n1 - n0), 0.0)


def _ewma(old: float | None, new: float, weight: float = 0.1) -> float:
    return new if old is None else old + weight * (new - old)


@dataclass
class LoadEstimates:
    """What all requests of one orchestrator learn together: the target's cost curve and how far
    the observed forward times are from it, the target's batch size, the draft's time per token,
    and acceptance (the prior of new requests)."""

    curve: CostCurve
    curve_scale: float = 1.0
    batch_size: float = 1.0
    draft_s_per_token: float | None = None
    accepted: float = 1.0  # decayed counts of accepted and rejected draft tokens: a Beta(1, 1) prior
    rejected: float = 1.0

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe_verify(self, compute_s: float, batch_size: int, batch_tokens: int) -> None:
        if batch_size:
            self.batch_size = _ewma(self.batch_size, batch_size)
        predicted = self.curve(batch_tokens) if self.curve and batch_tokens else 0.0
        if predicted > 0 and compute_s > 0:
            self.curve_scale = min(max(_ewma(self.curve_scale, compute_s / predicted), 0.25), 4.0)

    def observe_draft(self, wall_s: float, k: int) -> None:
        self.draft_s_per_token = _ewma(self.draft_s_per_token, wall_s / k)

    def observe_acceptance(self, k: int, accepted: int, decay: float = 0.995) -> None:
        self.accepted = self.accepted * decay + accepted
        self.rejected = self.rejected * decay + (accepted < k)


class FixedK:
    """The same K every round."""

    def __init__(self, num_speculative_tokens: int):
        self.num_speculative_tokens = num_speculative_tokens

    @property
    def max_speculative_tokens(self) -> int:
        """The most any round drafts (as AdaptiveK's field of that name)."""
        return self.num_speculative_tokens

    def next_k(self) -> int:
        return self.num_speculative_tokens

    def first_k(self) -> int:
        return self.num_speculative_tokens

    def observe(self, k: int, accepted: int) -> None:
        pass


@dataclass
class AdaptiveK:
    """Per request: its own acceptance (with the orchestrator's as a prior worth `prior_weight`
    rounds' evidence) and the shared load estimates decide each round's K."""

    load: LoadEstimates
    max_speculative_tokens: int
    prior_weight: float = 4.0
    accepted: int = 0
    rejected: int = 0
    rounds_at_zero: int = field(default=0, init=False)
    probe_every: int = field(default=PROBE_EVERY, init=False)

    @property
    def acceptance(self) -> float:
        prior = self.load.acceptance
        return (self.accepted + self.prior_weight * prior) / (self.accepted + self.rejected + self.prior_weight)

    def throughput(self, k: int, acceptance: float | None = None) -> float:
        """Tokens per second of the target's batch if every sequence in it drafted k tokens
        (accepted with this request's estimated acceptance, or `acceptance`)."""
        batch = max(self.load.batch_size, 1.0)
        target_s = self.load.curve_scale * self.load.curve(batch * (k + 1))
        draft_s = k * (self.load.draft_s_per_token or 0.0)
        accepted = self.acceptance if acceptance is None else acceptance
        return batch * expected_tokens(accepted, k) / max(target_s + draft_s, 1e-9)

    def first_k(self) -> int:
        """The K the request would start with (no probe counted): at 0 the orchestrator does not
        even start the draft's session until a round drafts."""
        if not self.load.curve or self.max_speculative_tokens == 0:
            return self.max_speculative_tokens
        best = max(range(self.max_speculative_tokens + 1), key=self.throughput)
        return best if self.throughput(best) >= MIN_GAIN * self.throughput(0) else 0

    def next_k(self) -> int:
        best = self.first_k()
        if best > 0 or not self.load.curve:
            self.rounds_at_zero, self.probe_every = 0, PROBE_EVERY
            return best
        self.rounds_at_zero += 1
        if self.rounds_at_zero < self.probe_every:
            return 0
        self.rounds_at_zero, self.probe_every = 0, min(2 * self.probe_every, MAX_PROBE_EVERY)
        at_zero = self.throughput(0)
        could_pay = any(self.throughput(k, 1.0) >= MIN_GAIN * at_zero for k in range(1, self.max_speculative_tokens + 1))
        return 1 if could_pay else 0

    def observe(self, k: int, accepted: int) -> None:
        if k == 0:
            return
        self.accepted += accepted
        self.rejected += accepted < k
        self.load.observe_acceptance(k, accepted)


Policy = FixedK | AdaptiveK


@dataclass(frozen=True)
class KSettings:
    """The orchestrator's settings of K (its flags of the same names)."""

    num_speculative_tokens: int = 4  # for requests that leave K unset; with `adaptive`, the most per round
    adaptive: bool = True
    max_speculative_tokens: int = 16  # the most a request may ask for


class KResolver:
    """Turns each request's K into its policy, the one place where K is validated and capped."""

    def __init__(self, settings: KSettings, target: ModelInfo, draft: ModelInfo | None):
        self.settings = settings
        # The most any round may draft: what both model services accept.
        self.service_limit = min(target.max_speculative_tokens, draft.max_speculative_tokens if draft else target.max_speculative_tokens)

    def policy(self, num_speculative_tokens: int | None, seeded_sampling: bool, load: LoadEstimates) -> Policy:
        """The policy of a request that asked for `num_speculative_tokens` (None: unset); adaptive K
        follows the orchestrator's shared `load` estimates. Seeded
        sampling keeps a fixed K: which tokens a seed produces depends on the K of every round,
        and adaptive K depends on the load, so the same seed would not give the same text."""
        limit = self.settings.max_speculative_tokens
        if num_speculative_tokens is not None and not 0 <= num_speculative_tokens <= limit:
            raise InvalidArgument(
                f"num_speculative_tokens must be in [0, {limit}], got {num_speculative_tokens}", "num_speculative_tokens"
            )
        asked = self.settings.num_speculative_tokens if num_speculative_tokens is None else num_speculative_tokens
        capped = min(asked, self.service_limit)
        if num_speculative_tokens is None and self.settings.adaptive and not seeded_sampling:
            return AdaptiveK(load, capped)
        return FixedK(capped)
