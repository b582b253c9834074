"""The draft's circuit breaker and per-call timeout (orchestrator/breaker.py) on their own, with a
fake clock and a fake draft; tests/test_faults.py shows them at work against real processes."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitOpen, GuardedDraft
from specdec.errors import Upstream


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_n_failures_probes_after_the_cooldown_and_closes_on_success():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        breaker.record_failure()
    breaker.record_success()  # consecutive failures only
    for _ in range(3):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == OPEN and not breaker.allow()
    clock.now = 10
    assert breaker.allow() and breaker.state == HALF_OPEN  # the probe
    assert not breaker.allow()  # one probe per cool-down
    breaker.record_failure()
    assert breaker.state == OPEN and not breaker.allow()
    clock.now = 20
    assert breaker.allow()  # the probe's client left without an outcome:
    clock.now = 30
    assert breaker.allow()  # the next probe goes a cool-down later
    breaker.record_success()
    assert breaker.state == CLOSED and breaker.allow() and breaker.allow()


class FailingDraft:
    """A draft whose every call fails with `code`."""

    def __init__(self, code: str):
        self.code, self.timeouts = code, []

    async def start_session(self, session_id, prompt, timeout, *more):
        self.timeouts.append(timeout)
        raise Upstream(self.code, "draft service: failed")


def test_guarded_draft_bounds_each_call_and_blames_only_the_draft():
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=10, clock=Clock())
    slow = FailingDraft("DEADLINE_EXCEEDED")
    guarded = GuardedDraft(slow, breaker, call_timeout_s=0.5)
    with pytest.raises(Upstream):  # the request's own deadline (0.2 s) ran out: not the draft's fault
        asyncio.run(guarded.start_session("s", [1], timeout=0.2))
    assert breaker.state == CLOSED
    with pytest.raises(Upstream):  # the draft's timeout (0.5 s) ran out
        asyncio.run(guarded.start_session("s", [1], timeout=30))
    assert slow.timeouts == [0.2, 0.5] and breaker.state == OPEN
    with pytest.raises(CircuitOpen):  # refused without a call
        asyncio.run(guarded.start_session("s", [1], timeout=30))
    assert len(slow.timeouts) == 2
