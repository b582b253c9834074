"""Per-session state of a model service, with a time-to-live and a memory budget.

Both model services keep one entry per generation, addressed by the orchestrator's session id.
Entries expire when unused for `ttl_s` (an orchestrator that crashed never ends its sessions), and
the sum of their sizes must stay under `max_bytes`: admitting more is RESOURCE_EXHAUSTED, never an
out-of-memory crash.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from specdec.errors import InvalidArgument, NotFound, ResourceExhausted

State = TypeVar("State")


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 256
    max_bytes: int = 8 << 30
    ttl_s: float = 600.0


class SessionStore(Generic[State]):
    """Session id -> state. Not thread-safe: a service touches it from one worker thread."""

    def __init__(self, limits: SessionLimits, size_of: Callable[[State], int], clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._size_of = size_of
        self._clock = clock
        self._entries: dict[str, tuple[State, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def total_bytes(self) -> int:
        return sum(self._size_of(state) for state, _ in self._entries.values())

    def add(self, session_id: str, state: State, field: str = "session_id") -> None:
        if not session_id:
            raise InvalidArgument("session_id must not be empty", field)
        if session_id in self._entries:
            raise InvalidArgument(f"session {session_id!r} already exists", field)
        self.expire()
        if len(self._entries) >= self.limits.max_sessions:
            raise ResourceExhausted(f"{len(self._entries)} sessions held, the limit is {self.limits.max_sessions}")
        self._entries[session_id] = (state, self._clock())

    def get(self, session_id: str, field: str = "session_id") -> State:
        """The session's state, refreshing its time-to-live."""
        try:
            state, _ = self._entries[session_id]
        except KeyError:
            raise NotFound(f"unknown session {session_id!r} (never started, ended, expired, or lost in a restart)", field) from None
        self._entries[session_id] = (state, self._clock())
        return state

    def remove(self, session_id: str) -> bool:
        return self._entries.pop(session_id, None) is not None

    def check_budget(self, extra_bytes: int = 0) -> None:
        """RESOURCE_EXHAUSTED when the sessions plus `extra_bytes` would exceed the memory budget."""
        used = self.total_bytes()
        if used + extra_bytes > self.limits.max_bytes:
            raise ResourceExhausted(
                f"KV cache budget exceeded: {used + extra_bytes} bytes needed, {self.limits.max_bytes} allowed"
            )

    def expire(self) -> list[str]:
        """Drop sessions unused for longer than the TTL; return their ids."""
        deadline = self._clock() - self.limits.ttl_s
        expired = [sid for sid, (_, used) in self._entries.items() if used < deadline]
        for sid in expired:
            del self._entries[sid]
        return expired
