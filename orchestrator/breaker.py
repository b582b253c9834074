"""Draft failure handling: a per-call timeout and a circuit breaker around the draft service.

The draft is an optimization, never a dependency: when it is down, hung or failing, a request goes
on target-only (speculation.py and generation.py already do that for any draft failure) and its
output stays exact. What this module adds is that later requests stop paying for a draft that is
known to be broken, and that speculation comes back by itself once the draft answers again:

    closed ──N consecutive failures──▶ open ──cool-down──▶ half-open ──probe succeeds──▶ closed
                                        ▲                      │
                                        └────probe fails───────┘

While the breaker is not closed, new sessions are refused at once with `CircuitOpen` (an
UNAVAILABLE `Upstream` error, so callers treat it like any draft failure: resilience4j's
CallNotPermittedException); sessions already started keep using the draft, and their outcomes
count too. Half-open lets one new session through per cool-down as the probe; a probe whose
outcome never arrives (its client left) simply lets the next one through a cool-down later.
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable, TypeVar

from orchestrator.backends import CallCost, DraftBackend
from specdec.errors import Upstream
from specdec.grammar import Grammar
from specdec.messages import ModelInfo, Proposal, ProposeWork

log = logging.getLogger(__name__)

T = TypeVar("T")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitOpen(Upstream):
    """The breaker refused a new draft session without calling the draft."""

    def __init__(self, message: str):
        super().__init__("UNAVAILABLE", message)


class CircuitBreaker:
    """Counts consecutive failures of one upstream. Single event loop, no locking needed."""

    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        if failure_threshold < 1 or cooldown_s < 0:
            raise ValueError("the breaker needs failure_threshold >= 1 and cooldown_s >= 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.state = CLOSED
        self.failures = 0  # consecutive, since the last success
        self._next_probe_at = 0.0

    def allow(self) -> bool:
        """Whether a new session may use the upstream now (True at most once per cool-down while
        not closed: that session is the probe)."""
        if self.state == CLOSED:
            return True
        now = self._clock()
        if now < self._next_probe_at:
            return False
        self._set(HALF_OPEN)
        self._next_probe_at = now + self.cooldown_s
        return True

    def seconds_until_probe(self) -> float:
        return max(0.0, self._next_probe_at - self._clock())

    def record_success(self) -> None:
        self.failures = 0
        self._set(CLOSED)

    def record_failure(self) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.failure_threshold:
            self._next_probe_at = self._clock() + self.cooldown_s
            self._set(OPEN)

    def _set(self, state: str) -> None:
        if state != self.state:
            log.warning("draft circuit breaker %s -> %s (%d consecutive failures)", self.state, state, self.failures)
            self.state = state


class GuardedDraft:
    """A DraftBackend behind a per-call timeout and a circuit breaker. Every draft call counts
    as a success or a failure, except those cut short by the request's own deadline or by
    cancellation (the client's doing, not the draft's)."""

    def __init__(self, draft: DraftBackend, breaker: CircuitBreaker, call_timeout_s: float | None):
        self.draft = draft
        self.breaker = breaker
        self.call_timeout_s = call_timeout_s or None  # 0: no limit of its own

    async def info(self, timeout: float | None = None) -> ModelInfo:
        return await self.draft.info(timeout)

    async def start_session(
        self, session_id: str, prompt: list[int], timeout: float | None, prompt_len: int = 0, grammar: Grammar | None = None
    ) -> CallCost:
        if not self.breaker.allow():
            raise CircuitOpen(
                f"draft skipped: circuit breaker open after {self.breaker.failures} consecutive draft failures, "
                f"next probe in {self.breaker.seconds_until_probe():.1f} s"
            )
        return await self._guarded(lambda t: self.draft.start_session(session_id, prompt, t, prompt_len, grammar), timeout)

    async def propose(self, work: ProposeWork, timeout: float | None) -> tuple[Proposal, CallCost]:
        return await self._guarded(lambda t: self.draft.propose(work, t), timeout)

    async def end_session(self, session_id: str, timeout: float | None) -> bool:
        return await self._guarded(lambda t: self.draft.end_session(session_id, t), timeout)

    async def _guarded(self, call: Callable[[float | None], Awaitable[T]], timeout: float | None) -> T:
        bound, own_deadline = self._bound(timeout)
        try:
            result = await call(bound)
        except Upstream as error:
            if not (own_deadline and error.code_name == "DEADLINE_EXCEEDED"):
                self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return result

    def _bound(self, timeout: float | None) -> tuple[float | None, bool]:
        """The call's timeout, and whether it is the request's deadline rather than the draft's."""
        if self.call_timeout_s is None:
            return timeout, timeout is not None
        if timeout is not None and timeout < self.call_timeout_s:
            return timeout, True
        return self.call_timeout_s, False
