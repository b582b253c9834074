"""Cross-request batching for a model service: concurrent calls from different sessions (and
different orchestrators) are fused into one engine call, so one forward pass serves them all.

No gRPC and no model code here: the scheduler only decides what runs together and when, on the
service's single model worker. The target uses it for Verify, the draft for Propose.

The policy is dynamic batching as in Triton's dynamic batcher and TGI's router:
- A batch holds at most `max_batch_items` items. A call is never split, and two items of one
  session never share a batch (the second waits for the next one).
- When the worker is free and calls are waiting, the batch starts at once if the waiting calls
  cover every session that was active recently (no one else is about to arrive) or the batch is
  full; otherwise it waits for the others, at most `max_wait_s` and half a forward pass. A lone
  request therefore never waits.
- A lone call (no other call queued or expected, no job waiting) whose batches have been short
  runs on the event loop itself instead of the worker thread: at concurrency 1 the two thread
  hand-offs would be a sizeable part of the time outside model compute. When the scheduler is
  idle as well, it runs in the caller's own task, sparing the hand-off to the serving task and
  back (two turns of the event loop).
- Other model work (session prefill chunks, session start and end) runs as jobs between batches,
  one job after each batch: a long prompt's prefill, cut into chunks, delays the others' rounds by
  one chunk at a time instead of stalling them for the whole prompt.
- Admission: beyond `max_queued_items` waiting items a call fails at once with RESOURCE_EXHAUSTED
  and a retry hint, instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

from specdec.errors import FailedPrecondition, ResourceExhausted, SpecdecError

Item = TypeVar("Item")
Result = TypeVar("Result")


# A batch waits for missing sessions at most this fraction of a forward pass: waiting half a pass
# to add a sequence to it costs less than running that sequence in a pass of its own.
WAIT_FRACTION = 0.5
# A lone call runs on the event loop only while batches take at most this long: the loop (health
# checks, other calls' arrival) waits for it meanwhile.
INLINE_MAX_S = 0.1


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_items: int = 32
    max_wait_s: float = 0.05
    max_queued_items: int = 1024
    active_window_s: float = 1.0  # a session that submitted within this window is expected back


@dataclass(frozen=True)
class BatchInfo:
    """What a call learns about the batch it ran in."""

    items: int  # items of all calls fused into the engine call
    tokens: int  # their tokens, as counted by the scheduler's `tokens_of`
    calls: int
    queue_seconds: float  # from submission until the batch started
    compute_seconds: float  # the engine call itself


@dataclass
class _Call(Generic[Item]):
    items: Sequence[Item]
    sessions: frozenset[str]
    future: asyncio.Future
    submitted: float


@dataclass
class _Job:
    fn: Callable
    args: tuple
    future: asyncio.Future


@dataclass
class BatchStats:
    """Running totals, for metrics and for tests that check batches really formed."""

    batches: int = 0
    items: int = 0
    largest: int = 0


class BatchScheduler(Generic[Item, Result]):
    """Fuses `submit` calls into engine calls of `run_batch(calls) -> per call a list of results or
    an exception`, run on `worker` (a runtime.ModelWorker); runs `job`s between batches. Items
    have a `session_id`."""

    def __init__(
        self,
        worker,
        run_batch: Callable[[list[Sequence[Item]]], list[list[Result] | Exception]],
        config: BatchingConfig = BatchingConfig(),
        tokens_of: Callable[[Item], int] = lambda item: 1,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.worker = worker
        self.config = config
        self._run_batch = run_batch
        self._tokens_of = tokens_of
        self._clock = clock
        self._calls: collections.deque[_Call] = collections.deque()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._urgent: collections.deque[_Job] = collections.deque()
        self._last_seen: dict[str, float] = {}
        self._arrived = asyncio.Event()
        self._last_compute_s = 0.0
        self._idle_since = clock()  # when the worker last finished a batch
        self._task: asyncio.Task | None = None
        self.stats = BatchStats()
        # metrics hook, once per batch: its items and each call's seconds in the queue
        self.on_batch: Callable[[int, list[float]], None] | None = None

    @property
    def queued_items(self) -> int:
        return sum(len(call.items) for call in self._calls)

    async def submit(self, items: Sequence[Item]) -> tuple[list[Result], BatchInfo]:
        """Run `items` in the next batch that has room; their results and the batch's figures."""
        waiting = self.queued_items
        if waiting + len(items) > self.config.max_queued_items:
            raise ResourceExhausted(
                f"{waiting} items are waiting for the model, the limit is {self.config.max_queued_items}",
                retry_after_s=max(0.05, self._drain_estimate_s()),
            )
        now = self._clock()
        sessions = frozenset(item.session_id for item in items)
        for session in sessions:
            self._last_seen[session] = now
        call = _Call(items, sessions, asyncio.get_running_loop().create_future(), now)
        if self._idle() and self._inline():
            await self._execute([call])  # runs to the end without yielding: see _inline
            return call.future.result()
        self._calls.append(call)
        self._wake()
        return await call.future

    async def job(self, fn: Callable, *args, urgent: bool = False):
        """fn(*args) on the worker, between two batches. Urgent jobs (cheap bookkeeping: ending
        a session, model info) run before the next batch and before the other jobs, which may be
        queued prefill chunks of many sessions."""
        job = _Job(fn, args, asyncio.get_running_loop().create_future())
        (self._urgent if urgent else self._jobs).append(job)
        self._wake()
        return await job.future

    def forget(self, session_id: str) -> None:
        """The session ended: do not wait for it to come back."""
        self._last_seen.pop(session_id, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _wake(self) -> None:
        self._arrived.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._serve())

    def _drain_estimate_s(self) -> float:
        if not self.stats.batches:
            return 1.0
        return self._last_compute_s * (1 + self.queued_items / max(1, self.config.max_batch_items))

    async def _serve(self) -> None:
        while self._calls or self._jobs or self._urgent:
            self._arrived.clear()
            while self._urgent:
                await self._run_job(self._urgent.popleft())
            if self._calls:
                await self._wait_for_company()
                batch = self._take()
                if batch:
                    await self._execute(batch)
            if self._jobs:
                await self._run_job(self._jobs.popleft())

    async def _run_job(self, job: _Job) -> None:
        if job.future.done():  # its caller gave up before it ran
            return
        try:
            job.future.set_result(await self.worker.run(job.fn, *job.args))
        except Exception as error:  # noqa: BLE001 - the job's caller gets its own error
            if not job.future.done():
                job.future.set_exception(error)

    def _expected_sessions(self) -> int:
        horizon = self._clock() - self.config.active_window_s
        for session in [s for s, seen in self._last_seen.items() if seen < horizon]:
            del self._last_seen[session]
        return len(self._last_seen)

    async def _wait_for_company(self) -> None:
        """Wait until the queued calls cover the recently active sessions, fill a batch, or the
        wait has lasted its bound: `max_wait_s`, and at most WAIT_FRACTION of the last batch's
        compute time, counted from the later of the oldest call's arrival and the end of the last
        batch. Counting from the end of the last batch matters: calls that arrived during a
        forward pass must still wait for the sessions whose results that pass just returned,
        or the sessions split into two groups that alternate in half-full batches."""
        bound = self.config.max_wait_s
        if self._last_compute_s:
            bound = min(bound, WAIT_FRACTION * self._last_compute_s)
        while True:
            queued = sum(len(c.sessions) for c in self._calls if not c.future.done())
            if queued >= min(self._expected_sessions(), self.config.max_batch_items):
                return
            left = max(self._calls[0].submitted, self._idle_since) + bound - self._clock()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Call]:
        """The oldest calls that fit one batch, skipping cancelled calls and sessions already in it."""
        batch, sessions, items, deferred = [], set(), 0, collections.deque()
        while self._calls:
            call = self._calls.popleft()
            if call.future.done():
                continue
            fits = items + len(call.items) <= self.config.max_batch_items or not batch
            if not fits or call.sessions & sessions:
                deferred.append(call)
                continue
            batch.append(call)
            sessions |= call.sessions
            items += len(call.items)
        self._calls.extendleft(reversed(deferred))
        return batch

    def _idle(self) -> bool:
        """Nothing queued and no serving task under way."""
        return (self._task is None or self._task.done()) and not (self._calls or self._jobs or self._urgent)

    def _inline(self) -> bool:
        """A batch of one call taken now may run on the event loop: no other call is queued or
        expected, the last batch was short, and the worker thread has nothing under way."""
        lone = not (self._calls or self._jobs or self._urgent) and self._expected_sessions() <= 1
        return lone and 0 < self._last_compute_s <= INLINE_MAX_S and self.worker.idle

    async def _execute(self, batch: list[_Call]) -> None:
        started = self._clock()
        try:
            here = len(batch) == 1 and self._inline()
            (outcomes, compute_s) = await self.worker.timed(self._run_batch, [call.items for call in batch], here=here)
        except Exception as error:  # noqa: BLE001 - every call of the batch gets the error
            outcomes, compute_s = [error] * len(batch), self._clock() - started
        self._last_compute_s = compute_s
        self._idle_since = self._clock()
        items = sum(len(call.items) for call in batch)
        tokens = sum(self._tokens_of(item) for call in batch for item in call.items)
        self.stats.batches += 1
        self.stats.items += items
        self.stats.largest = max(self.stats.largest, items)
        if self.on_batch is not None:
            self.on_batch(items, [started - call.submitted for call in batch])
        for call, outcome in zip(batch, outcomes):
            if call.future.done():
                continue
            if isinstance(outcome, Exception):
                call.future.set_exception(outcome)
            else:
                call.future.set_result((outcome, BatchInfo(items, tokens, len(batch), started - call.submitted, compute_s)))


def admit_calls(
    calls: list[Sequence[Item]], check: Callable[[Sequence[Item]], list]
) -> tuple[list[list | SpecdecError], list[tuple[Item, object]]]:
    """Validate the calls of one fused batch on their own: `check(call)` returns the call's
    per-item session states or raises, and a session may appear in one call of the batch only.
    Returns per call its states or its error, and the valid calls' (item, state) pairs in order:
    the engine's batch."""
    outcomes: list[list | SpecdecError] = []
    admitted: list[tuple[Item, object]] = []
    for call in calls:
        try:
            states = check(call)
            taken = {id(state) for _, state in admitted}
            for index, state in enumerate(states):
                if id(state) in taken:
                    raise FailedPrecondition("another call of the same batch works on this session", f"items[{index}].session_id")
        except SpecdecError as error:
            outcomes.append(error)
            continue
        outcomes.append(states)
        admitted.extend(zip(call, states))
    return outcomes, admitted


def per_call(outcomes: list[list | SpecdecError], results: Sequence) -> list[list | SpecdecError]:
    """Split the engine's flat per-item results back into the calls they came from; failed calls
    keep their error."""
    flat = iter(results)
    return [outcome if isinstance(outcome, SpecdecError) else [next(flat) for _ in outcome] for outcome in outcomes]
