"""Replicas of a model service behind the interface of one (backends.py): several target or draft
endpoints, each with its own health, and each session placed on one of them.

A new session goes to the healthy replica that runs the fewest of this orchestrator's sessions;
every later call of the session goes to the same replica (its KV cache lives there). When a
replica fails a call of a session, the round loop (speculation.py) starts the session again,
from the prompt and the tokens committed so far, with `start_session` under the same id: the set
then places it on another healthy replica (the failed one is avoided until its health check
passes again), or on the same one when it is the only one left.

Endpoints: `host:port`, a comma-separated list of them, or `dns:///name:port` for every address
the name resolves to (a Kubernetes headless Service), resolved again at every health round, so
that replicas come and go with the Service's pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field

from orchestrator.backends import CallCost
from specdec.errors import SpecdecError, Upstream
from specdec.messages import ModelInfo

log = logging.getLogger(__name__)

DNS_SCHEME = "dns:///"
# Statuses after which a session's replica is taken for lost: unreachable, restarting, hung on
# this call, or back without the session (a restarted replica holds none).
REPLICA_FAILURES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND", "CANCELLED"})


def is_replica_failure(error: SpecdecError) -> bool:
    return isinstance(error, Upstream) and error.code_name in REPLICA_FAILURES


async def resolve(spec: str) -> list[str]:
    """The endpoints of a --target/--draft value (see the module's docstring), in order, without
    repeats; a dns:/// name that resolves to nothing contributes none."""
    endpoints = []
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        if not entry.startswith(DNS_SCHEME):
            endpoints.append(entry)
            continue
        host, _, port = entry.removeprefix(DNS_SCHEME).rpartition(":")
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (socket.gaierror, ValueError) as error:
            log.warning("%s does not resolve: %s", entry, error)
            continue
        for family, _, _, _, address in found:
            endpoints.append(f"[{address[0]}]:{port}" if family == socket.AF_INET6 else f"{address[0]}:{port}")
    return list(dict.fromkeys(endpoints))


class NoReplica(Upstream):
    """Every replica of a role is gone from its name (dns:///) or serves another vocabulary."""

    def __init__(self, role: str):
        super().__init__("UNAVAILABLE", f"no {role} replica is available")


@dataclass(eq=False)
class Replica:
    """One endpoint: its backend (GrpcTarget, or a GuardedDraft), what its health checks say, and
    how many of this orchestrator's sessions it holds."""

    address: str
    backend: object
    channel: object = None  # its gRPC channel (health checks); None in-process
    healthy: bool = True
    retired: bool = False  # its name no longer resolves to it, or it serves another vocabulary: no new sessions
    admitted: bool = False  # its ModelInfo was checked against the target's vocabulary
    sessions: int = 0


@dataclass(eq=False)
class ReplicaSet:
    """Several replicas of one model service as one backend (the calls common to both roles)."""

    role: str
    replicas: list[Replica] = field(default_factory=list)
    placement: dict[str, Replica] = field(default_factory=dict)  # session id -> its replica

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy and not r.retired]

    def _place(self, avoid: Replica | None) -> Replica:
        """The healthy replica with the fewest sessions, other than `avoid` (the one a session
        just failed on). With none healthy, any replica still named, `avoid` last: a health check
        may have timed out on a busy replica, but `avoid` surely failed."""
        named = [r for r in self.replicas if not r.retired]
        candidates = [r for r in self.healthy() if r is not avoid] or [r for r in named if r is not avoid] or named
        if not candidates:
            # an UNAVAILABLE Upstream error like a refused call: a draft role's caller goes on
            # target-only, a target role's caller starts the session again or fails with it
            raise NoReplica(self.role)
        return min(candidates, key=lambda r: (r.sessions, self.replicas.index(r)))

    def of(self, session_id: str) -> Replica:
        replica = self.placement.get(session_id)
        if replica is None:
            raise Upstream("NOT_FOUND", f"session {session_id!r} has no {self.role} replica")
        return replica

    async def call(self, session_id: str, make_call):
        """`make_call(backend)` on the session's replica; a replica failure marks it unhealthy
        until its health check passes again."""
        replica = self.of(session_id)
        try:
            return await make_call(replica.backend)
        except SpecdecError as error:
            if is_replica_failure(error) and replica.healthy:
                replica.healthy = False
                log.warning("%s replica %s failed (%s: %s)", self.role, replica.address, error.code_name, error.message)
            raise

    async def info(self, timeout: float | None = None) -> ModelInfo:
        return await self._place(None).backend.info(timeout)

    async def start_session(self, session_id: str, prompt: list[int], timeout: float | None, *args, **kwargs) -> CallCost:
        """Place the session (again, when it had a replica: a rebuild, which avoids that one) and
        start it there."""
        previous = self.placement.pop(session_id, None)
        if previous is not None:
            previous.sessions -= 1
        replica = self._place(previous)
        if previous is replica:  # the only replica left (perhaps back): its copy of the session goes first
            with contextlib.suppress(SpecdecError):
                await replica.backend.end_session(session_id, timeout)
        elif previous is not None:
            self._forget_on(previous, session_id)
        self.placement[session_id] = replica
        replica.sessions += 1
        return await self.call(session_id, lambda backend: backend.start_session(session_id, prompt, timeout, *args, **kwargs))

    async def end_session(self, session_id: str, timeout: float | None) -> bool:
        """End the session on its replica; False when it has none (never placed, or ended)."""
        replica = self.placement.pop(session_id, None)
        if replica is None:
            return False
        replica.sessions -= 1
        return await replica.backend.end_session(session_id, timeout)

    def _forget_on(self, replica: Replica, session_id: str) -> None:
        """End a session on a replica it is moving away from, in the background: the replica is
        probably gone, and if it is not, its copy would otherwise wait for the TTL."""
        async def end():
            with contextlib.suppress(SpecdecError):
                await replica.backend.end_session(session_id, 2.0)

        task = asyncio.ensure_future(end())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


class TargetReplicas(ReplicaSet):
    async def verify(self, work, timeout: float | None):
        return await self.call(work.session_id, lambda backend: backend.verify(work, timeout))


class DraftReplicas(ReplicaSet):
    async def propose(self, work, timeout: float | None):
        return await self.call(work.session_id, lambda backend: backend.propose(work, timeout))
