"""A grpc.aio server as every service runs it: explicit message and keepalive options, the
interceptors (authentication, drain gate, error statuses), health checking that reports
NOT_SERVING until the service says otherwise, reflection, TLS, and graceful shutdown on SIGTERM
(drain, then stop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec.rpc.errors import ErrorStatus
from specdec.rpc.interceptors import BearerTokenAuth, DrainGate
from specdec.rpc.tls import server_credentials

T = TypeVar("T")

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServerOptions:
    max_message_bytes: int = 16 << 20
    max_concurrent_rpcs: int | None = None
    keepalive_time_s: float = 30.0
    reflection: bool = True
    bearer_tokens: tuple[str, ...] = ()  # accepted `authorization: Bearer` tokens; empty: no authentication
    credentials: grpc.ServerCredentials | None = None  # TLS (rpc/tls.py); None: plaintext


def server_options(config) -> ServerOptions:
    """ServerOptions from a ServerConfig (specdec/config.py)."""
    return ServerOptions(
        max_message_bytes=config.max_message_mb << 20,
        max_concurrent_rpcs=config.max_concurrent_rpcs or None,
        keepalive_time_s=config.keepalive_s,
        reflection=config.reflection,
        credentials=server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file),
    )


def channel_options(max_message_bytes: int = 16 << 20, keepalive_time_s: float = 30.0) -> list[tuple[str, int]]:
    """Options for clients and servers alike: explicit message limits (gRPC's default receive
    limit is 4 MiB) and keepalive pings, so a dead peer is noticed."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


@dataclass
class Server:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    gate: DrainGate

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Start answering, with health NOT_SERVING (grpc's health servicer starts as SERVING)."""
        await self.set_serving(False)
        await self.server.start()

    async def stop(self, grace_s: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)

    async def drain(self, grace_s: float, busy: Callable[[], int]) -> None:
        """Graceful shutdown (SIGTERM): report NOT_SERVING at once and refuse new work (the gate's
        methods: UNAVAILABLE), while health checks and the calls of work already running go on;
        wait until `busy()` (work running) is 0 or `grace_s` has passed, then stop, cancelling
        whatever is still running. The port stays open while draining so that probes and load
        balancers read NOT_SERVING instead of a refused connection, and a model service keeps
        answering the rounds of sessions an orchestrator has already started."""
        deadline = time.monotonic() + grace_s
        self.gate.close()
        await self.set_serving(False)
        while busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if busy():
            log.warning("grace period of %.1f s over: cancelling %d unfinished", grace_s, busy())
        await self.server.stop(max(deadline - time.monotonic(), 0.0))


def create_server(
    address: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: tuple[str, ...],
    options: ServerOptions = ServerOptions(),
    opening: tuple[str, ...] = (),
) -> Server:
    """A grpc.aio server bound to `address` (port 0 picks a free port; TLS when `options` has
    credentials) with health checking, which reports NOT_SERVING until `set_serving(True)`, and
    reflection when enabled. `opening`: the full names (/package.Service/Method) of the methods
    that start new work, refused while draining. Not started yet."""
    gate = DrainGate(opening)
    # Authentication first: an unauthenticated caller learns nothing, not even that we drain.
    interceptors = [BearerTokenAuth(options.bearer_tokens)] if options.bearer_tokens else []
    server = grpc.aio.server(
        options=channel_options(options.max_message_bytes, options.keepalive_time_s),
        maximum_concurrent_rpcs=options.max_concurrent_rpcs,
        interceptors=[*interceptors, gate, ErrorStatus()],
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if options.reflection:
        reflection.enable_server_reflection(
            (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
    if options.credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, options.credentials)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return Server(server, port, health_servicer, service_names, gate)


def stop_requested() -> asyncio.Event:
    """An event set on SIGTERM or SIGINT, with the handlers installed now. A service's main calls
    it first thing: in a container the service is process 1, and the kernel drops any signal that
    process 1 has no handler for, so a SIGTERM during start-up (loading a model, waiting for the
    model services) would otherwise be lost until the runtime's SIGKILL (found when the Compose
    stack first ran)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def unless_stopped(starting: Awaitable[T], stop: asyncio.Event) -> T | None:
    """What `starting` returns, or None once `stop` is set first (`starting` is then cancelled)."""
    task, stopped = asyncio.ensure_future(starting), asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None
