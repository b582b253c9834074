"""gRPC server plumbing shared by the three services: server creation (port 0 for tests), health
checking, reflection, TLS and mutual TLS, graceful shutdown on SIGTERM (drain, then stop), a single
model worker thread, and the translation of domain errors into gRPC statuses with rich details.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from specdec import metrics, wire
from specdec.batching import BatchingConfig, BatchScheduler
from specdec.errors import ResourceExhausted, SpecdecError, Unavailable
from specdec.sessions import SessionLimits
from specdec.v1 import common_pb2

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
    credentials: grpc.ServerCredentials | None = None  # TLS (server_credentials()); None: plaintext


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


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Calls must carry `authorization: Bearer <token>` with one of the accepted tokens, else they
    end with UNAUTHENTICATED before reaching a servicer. Health checks and reflection stay open:
    load balancers, probes and grpcurl carry no token."""

    EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, tokens: tuple[str, ...]):
        self._tokens = tuple(t.encode() for t in tokens)

    def _authorized(self, metadata) -> bool:
        presented = dict(metadata or ()).get("authorization", "")
        scheme, _, token = presented.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        # compare_digest against every token: the time taken does not tell which one nearly matched
        return sum(hmac.compare_digest(token.encode(), accepted) for accepted in self._tokens) > 0

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.EXEMPT) or self._authorized(details.invocation_metadata):
            return handler
        message = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
        return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, message)


class DrainGate(grpc.aio.ServerInterceptor):
    """Once closed (the server drains on SIGTERM), calls of the `opening` methods, those that start
    new work (a generation, a session), end at once with UNAVAILABLE, which clients may retry on
    another replica; every other call (health, the rounds of running sessions) passes."""

    def __init__(self, opening: tuple[str, ...]):
        self._opening = frozenset(opening)
        self.closed = False

    def close(self) -> None:
        self.closed = True

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not self.closed or details.method not in self._opening:
            return handler
        return refusal(handler, grpc.StatusCode.UNAVAILABLE, "the server is shutting down: retry on another replica")


def refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary or server-streaming) that ends the call
    with `code` without running the servicer."""

    async def deny(request, context):
        await context.abort(code, message)

    async def deny_stream(request, context):
        await deny(request, context)
        yield  # never reached: makes this an async generator, as streaming handlers are

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)


class MalformedRequests(grpc.aio.ServerInterceptor):
    """A request that does not parse as its message (corrupt wire format, invalid UTF-8 in a
    string field) ends with INVALID_ARGUMENT. grpc.aio would answer UNKNOWN and log a traceback
    per call, which lets any client fill the logs. Only our own specdec.* methods, whose streaming
    handlers are async generators; health and reflection keep grpc's handling."""

    PREFIX = "/specdec."

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or not details.method.startswith(self.PREFIX):
            return handler
        decode = handler.request_deserializer

        async def parsed(raw: bytes, context):
            try:
                return decode(raw)
            except DecodeError as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message: {error}")

        if handler.unary_stream:

            async def stream(raw, context):
                async for response in handler.unary_stream(await parsed(raw, context), context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(stream, None, handler.response_serializer)

        async def unary(raw, context):
            return await handler.unary_unary(await parsed(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary, None, handler.response_serializer)


def read_tokens(path: str) -> tuple[str, ...]:
    """Accepted bearer tokens, one per line of `path` (blank lines and # comments ignored)."""
    if not path:
        return ()
    with open(path) as lines:
        tokens = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise ValueError(f"{path} holds no token")
    return tokens


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
        interceptors=[*interceptors, gate, MalformedRequests()],
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


def read_pem(path: str) -> bytes | None:
    """The bytes of a PEM file; None for an empty path (the option is not used)."""
    if not path:
        return None
    with open(path, "rb") as pem:
        return pem.read()


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials | None:
    """TLS for a listening port from PEM files, or None (plaintext) when no certificate is given.
    With `client_ca_file`, clients must present a certificate that CA signed (mutual TLS); a
    client without one fails the handshake and its calls end UNAVAILABLE."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise ValueError("a client CA (--tls-client-ca-file) needs the server's own --tls-cert-file and --tls-key-file")
        return None
    if not (cert_file and key_file):
        raise ValueError("--tls-cert-file and --tls-key-file go together")
    return grpc.ssl_server_credentials(
        [(read_pem(key_file), read_pem(cert_file))],
        root_certificates=read_pem(client_ca_file),
        require_client_auth=bool(client_ca_file),
    )


def channel_credentials(ca_file: str, cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """TLS for a client channel from PEM files: the CA that signed the server's certificate (empty:
    the system's roots), and the client's own certificate and key for mutual TLS."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate and its key go together")
    return grpc.ssl_channel_credentials(read_pem(ca_file), read_pem(key_file), read_pem(cert_file))


async def wait_for_signal() -> None:
    """Return on SIGTERM or SIGINT (the caller then drains and stops)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def server_options(config) -> ServerOptions:
    """ServerOptions from a ServerConfig (specdec/config.py)."""
    return ServerOptions(
        max_message_bytes=config.max_message_mb << 20,
        max_concurrent_rpcs=config.max_concurrent_rpcs or None,
        keepalive_time_s=config.keepalive_s,
        reflection=config.reflection,
        credentials=server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file),
    )


def batching_config(config) -> BatchingConfig:
    """BatchingConfig from a ModelServiceConfig."""
    return BatchingConfig(
        max_batch_items=config.max_batch_items, max_wait_s=config.batch_wait_ms / 1000, max_queued_items=config.max_queued_items
    )


def session_limits(config) -> SessionLimits:
    """SessionLimits from a ModelServiceConfig."""
    return SessionLimits(max_sessions=config.max_sessions, max_bytes=config.max_cache_mb << 20, ttl_s=config.session_ttl_s)


@dataclass
class RunningModelService:
    server: Server
    servicer: "SessionServicerBase"
    worker: ModelWorker
    expiry: asyncio.Task
    metrics: metrics.MetricsEndpoint | None = None
    untrack_sessions: Callable[[], None] = lambda: None

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace_s: float = 0.0) -> None:
        """Drain (new sessions refused, open ones served until their orchestrators end them or
        `grace_s` passes), then stop."""
        self.expiry.cancel()
        await self.server.drain(grace_s, lambda: len(self.servicer.engine.sessions))
        await self.servicer.scheduler.close()
        self.worker.shutdown()
        self.untrack_sessions()
        if self.metrics is not None:
            await self.metrics.close()


async def start_model_service(
    config,
    servicer: "SessionServicerBase",
    add_to_server: Callable,
    service_name: str,
    load_engine: Callable[[], object],
) -> RunningModelService:
    """Start serving at once (health NOT_SERVING, model RPCs UNAVAILABLE) and the metrics
    endpoint when configured, load and warm up the engine on the model worker, then report
    SERVING."""
    server = create_server(
        f"{config.host}:{config.port}",
        lambda s: add_to_server(servicer, s),
        (service_name,),
        server_options(config),
        opening=(f"/{service_name}/StartSession",),
    )
    await server.start()
    endpoint = metrics.serve(config.host, config.metrics_port)
    log.info("%s listening on %s:%d, loading the model", service_name, config.host, server.port)
    started = time.perf_counter()
    try:
        engine = await servicer.worker.run(load_engine)
    except BaseException:
        await server.stop(0)
        if endpoint is not None:
            await endpoint.close()
        raise
    servicer.engine = engine
    untrack = metrics.track_sessions(metrics.service_label(service_name), lambda: len(engine.sessions))
    await server.set_serving(True)
    log.info("%s SERVING after %.1f s of loading and warm-up", service_name, time.perf_counter() - started)
    expiry = asyncio.create_task(expire_sessions_forever(engine, servicer.worker, min(60.0, config.session_ttl_s / 4)))
    return RunningModelService(server, servicer, servicer.worker, expiry, endpoint, untrack)


async def run_model_service(config, start: Callable) -> None:
    """A service's main: start it, serve until SIGTERM, drain, stop."""
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    service = await start(config)
    await wait_for_signal()
    log.info("stopping: draining in-flight calls for up to %.1f s", config.grace_s)
    await service.stop(config.grace_s)


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


def timed(fn: Callable) -> Callable:
    """fn, returning (its result, the seconds it took)."""

    @functools.wraps(fn)
    def call(*args):
        started = time.perf_counter()
        result = fn(*args)
        return result, time.perf_counter() - started

    return call


class ModelWorker:
    """One thread that runs all model work of a service, in arrival order. Engines are not
    thread-safe, and a forward pass must not block the event loop (health checks, new calls)."""

    def __init__(self, name: str):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def timed(self, fn: Callable, *args) -> tuple[object, float]:
        """fn(*args) and the seconds it took inside the worker (queueing excluded)."""
        return await self.run(timed(fn), *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def error_status(error: SpecdecError) -> grpc.Status:
    """The gRPC status of a domain error, with a BadRequest naming the field when there is one
    and a RetryInfo when retrying later may succeed."""
    status = status_pb2.Status(code=getattr(code_pb2, error.code_name), message=error.message)
    if error.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    if isinstance(error, ResourceExhausted):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)


def grpc_errors(method):
    """Servicer method decorator: domain errors become their gRPC status; anything unexpected is
    logged and becomes INTERNAL instead of killing the call with an opaque UNKNOWN."""

    async def fail(context, error: Exception):
        if isinstance(error, SpecdecError):
            await context.abort_with_status(error_status(error))
        log.exception("internal error in %s", method.__qualname__, exc_info=error)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for response in method(self, request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - the boundary where every error gets a status
                await fail(context, error)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001
            await fail(context, error)

    return unary_wrapper


class SessionServicerBase:
    """The RPCs the draft and target services share: model info and the session life cycle, and
    the batching scheduler (specdec/batching.py) through which all their model work runs.
    `engine` has info(), start_session(id, prompt) and end_session(id); a subclass provides
    `run_batch(calls)`, the engine call that serves several fused calls, and its metrics labels."""

    service = "model"  # the `service` label of its metrics
    batched_rpc = ""  # the RPC whose calls are fused into batches

    def __init__(self, worker: ModelWorker, batching: BatchingConfig = BatchingConfig(), engine=None):
        self.worker = worker
        self._engine = engine
        self.scheduler = BatchScheduler(worker, lambda calls: self.run_batch(calls), batching, tokens_of=self.tokens_of)
        self.scheduler.on_batch = self._observe_batch
        metrics.QUEUE_LENGTH.labels(service=self.service).set_function(lambda: self.scheduler.queued_items)

    def run_batch(self, calls: list) -> list:
        raise NotImplementedError

    @staticmethod
    def tokens_of(item) -> int:
        """Tokens an item adds to its batch's forward pass."""
        return 1

    def _observe_batch(self, items: int, queue_seconds: list[float]) -> None:
        metrics.BATCH_SIZE.labels(service=self.service, rpc=self.batched_rpc).observe(items)
        for seconds in queue_seconds:
            metrics.QUEUE_TIME.labels(service=self.service).observe(seconds)

    @property
    def engine(self):
        if self._engine is None:
            raise Unavailable("the model is still loading")
        return self._engine

    @engine.setter
    def engine(self, engine) -> None:
        self._engine = engine

    @grpc_errors
    async def GetModelInfo(self, request, context):
        return wire.model_info_to_proto(await self.scheduler.job(self.engine.info, urgent=True))

    @grpc_errors
    async def StartSession(self, request, context):
        seconds = await self.start_session(request.session_id, list(request.prompt_token_ids))
        return common_pb2.StartSessionResponse(compute_seconds=seconds)

    async def start_session(self, session_id: str, prompt: list[int]) -> float:
        """Open and prefill a session between batches; seconds of compute."""
        return await self.scheduler.job(self.engine.start_session, session_id, prompt)

    @grpc_errors
    async def EndSession(self, request, context):
        self.scheduler.forget(request.session_id)
        existed = await self.scheduler.job(self.engine.end_session, request.session_id, urgent=True)
        return common_pb2.EndSessionResponse(existed=existed)


async def expire_sessions_forever(engine, worker: ModelWorker, every_s: float) -> None:
    """Drop sessions whose TTL passed (their orchestrator crashed or forgot them)."""
    while True:
        await asyncio.sleep(every_s)
        expired = await worker.run(engine.sessions.expire)
        if expired:
            log.warning("expired %d idle sessions: %s", len(expired), ", ".join(expired[:5]))
