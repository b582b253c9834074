"""The orchestrator's view of its model services' health: at start-up it waits until each reports
SERVING; afterwards its own health follows its target's: without the target no request can succeed, so
while the target is unreachable (or reports NOT_SERVING) the orchestrator reports NOT_SERVING,
and load balancers route around it; it reports SERVING again by itself once the target answers.
The draft does not count: without it requests still succeed, target-only (breaker.py).

Requests in flight when the target goes away are not retried (the target's session, its KV
cache, is gone with it): they end with UNAVAILABLE naming the target (backends.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

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


async def follow_target_health(channel: grpc.aio.Channel, server: Server, period_s: float, what: str) -> None:
    """Poll the target's health every `period_s` (each check may take as long) and set the
    orchestrator's to match, logging each change. Runs until cancelled; the orchestrator must
    cancel it before it drains, or it could report SERVING again."""
    stub = health_pb2_grpc.HealthStub(channel)
    serving = True  # start() reports SERVING once the target answered
    while True:
        await asyncio.sleep(period_s)
        now_serving = await peer_is_serving(stub, period_s)
        if now_serving != serving:
            serving = now_serving
            log.warning("%s is %s: orchestrator %s", what, *(("back", "SERVING") if serving else ("unreachable", "NOT_SERVING")))
            await server.set_serving(serving)


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
