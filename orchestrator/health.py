"""The orchestrator's view of its model services' health: at start-up it waits until a replica
of each reports SERVING; afterwards it checks every replica each period (replicas.py places new
sessions on healthy ones only) and follows its targets' health: without a target no request can
succeed, so while no target replica is reachable (and SERVING) the orchestrator reports
NOT_SERVING, and load balancers route around it; it reports SERVING again by itself once one
answers. Drafts do not count: without them requests still succeed, target-only (breaker.py).

Requests in flight when their target replica goes away start their session again on another
replica (or the same one once it is back) from the tokens committed so far (speculation.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.replicas import ReplicaSet
from specdec.errors import Unavailable
from specdec.rpc.server import SERVING, Server

log = logging.getLogger(__name__)

# A model service that restarts (a crash, a rolling update) should be found again within seconds:
# gRPC's default reconnect backoff grows to 120 s. Capping it at 2 s costs one TCP connect attempt
# per peer every 2 s while that peer is down.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000)]


async def peer_is_serving(stub: health_pb2_grpc.HealthStub, timeout_s: float) -> bool:
    """One health check of a peer: False when it is unreachable, slow or not serving."""
    try:
        response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError:
        return False
    return response.status == SERVING


async def follow_replicas(targets: ReplicaSet, drafts: ReplicaSet | None, server: Server, period_s: float, refresh, admit) -> None:
    """Every `period_s`: `refresh()` (endpoints found again by name), then one health check of
    every replica (each may take as long), setting its `healthy` (a replica serving for the first
    time only once `admit(replica)` checked it), and the orchestrator's own status: SERVING while
    any target replica is. Logs each change. Runs until cancelled; the orchestrator must cancel
    it before it drains, or it could report SERVING again."""
    serving = True  # start() reports SERVING once a target answered
    while True:
        await asyncio.sleep(period_s)
        await refresh()
        sets = [targets] + ([drafts] if drafts is not None else [])
        replicas = [(s.role, r) for s in sets for r in s.replicas if not r.retired]
        states = await asyncio.gather(*(peer_is_serving(health_pb2_grpc.HealthStub(r.channel), period_s) for _, r in replicas))
        for (role, replica), healthy in zip(replicas, states):
            if healthy and not replica.admitted:
                healthy = await admit(replica)
            if healthy != replica.healthy:
                log.warning("%s replica %s is %s", role, replica.address, "back" if healthy else "unreachable")
                replica.healthy = healthy
        now_serving = bool(targets.healthy())
        if now_serving != serving:
            serving = now_serving
            log.warning("orchestrator %s: %s", *(("SERVING", "a target replica is back") if serving else ("NOT_SERVING", "no target replica is reachable")))
            await server.set_serving(serving)


async def first_serving(channels: list[grpc.aio.Channel], timeout_s: float, what: str) -> int:
    """The index of the first of `channels` whose peer reports SERVING (wait_until_serving on all)."""
    waits = [asyncio.ensure_future(wait_until_serving(channel, timeout_s, what)) for channel in channels]
    try:
        for done in asyncio.as_completed(waits):
            try:
                await done
            except Unavailable:
                continue
            return next(index for index, wait in enumerate(waits) if wait.done() and not wait.cancelled() and wait.exception() is None)
        raise Unavailable(f"no {what} reported SERVING within {timeout_s:.0f} s")
    finally:
        for wait in waits:
            wait.cancel()


async def wait_until_serving(channel: grpc.aio.Channel, timeout_s: float, what: str) -> None:
    """Poll the peer's health until it reports SERVING (its model is loaded and warmed up)."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Unavailable(f"{what} did not report SERVING within {timeout_s:.0f} s")
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=min(left, 5.0), wait_for_ready=True)
            if response.status == SERVING:
                return
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"{what} health check failed: {error.code().name}: {error.details()}") from error
        await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
