"""The HTTP API's application and server: the Starlette routes on top of the orchestrator's
servicer (with its drain gate), bearer tokens (BearerAuth), and uvicorn serving them in the
orchestrator's event loop, with TLS, from start to a graceful stop (serve, RunningHttp).

Each generation runs in a task of its own (`Generation`), fed to the response through a queue: a
client that disconnects (or a unary request whose client gives up) cancels that task once, and the
engine's clean-up ends both sessions. Inside Starlette's streaming response the generation would
be cancelled by anyio's cancel scope, which cancels again at every await and could cut that
clean-up short.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from orchestrator.generation import GenerationEvent
from orchestrator.openai_api.parameters import (
    ModelNotFound,
    ParameterError,
    ParsedRequest,
    error_content,
    error_json,
    parse_request,
)
from orchestrator.openai_api.responses import sse_chunks, unary_body
from orchestrator.servicer import METRICS_SERVICE, OrchestratorServicer
from specdec import metrics
from specdec.errors import SpecdecError, Unavailable

log = logging.getLogger(__name__)

EXEMPT_PATHS = ("/health", "/metrics")  # open without a token, as gRPC health checks are
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


# Generations ----------------------------------------------------------------------------------


class Generation:
    """One generation running in its own task; its events (or its error) wait in a queue for the
    response to take them. `cancel()` is safe to call at any time, also once it finished."""

    def __init__(self, events: AsyncIterator[GenerationEvent], tasks: set):
        self._queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.ensure_future(self._pump(events))
        tasks.add(self.task)
        self.task.add_done_callback(tasks.discard)

    async def _pump(self, events: AsyncIterator[GenerationEvent]) -> None:
        try:
            async for event in events:
                self._queue.put_nowait(event)
        except asyncio.CancelledError:
            self._queue.put_nowait(Unavailable("the generation was cancelled: the server is shutting down"))
            raise
        except Exception as error:  # noqa: BLE001 - handed to the response, which maps it
            self._queue.put_nowait(error)
        except BaseException as error:
            self._queue.put_nowait(error)
            raise

    async def next(self) -> GenerationEvent:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def collect(self) -> list[GenerationEvent]:
        events = [await self.next()]
        while events[-1].finish_reason is None:
            events.append(await self.next())
        return events

    def cancel(self) -> None:
        self.task.cancel()


def _cancel(generations: list[Generation]) -> None:
    for generation in generations:
        generation.cancel()


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, awaitable):
    """The result of `awaitable`, unless the client disconnects first (ClientGone)."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if work.done() and not work.cancelled():
        return work.result()
    raise ClientGone()


# The application ------------------------------------------------------------------------------


def token_accepted(header: str, tokens: tuple[bytes, ...]) -> bool:
    """`Authorization: Bearer <token>` with one of the tokens (compared in constant time, as the
    gRPC interceptor does, specdec/rpc/interceptors.py)."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return sum(hmac.compare_digest(token.strip().encode(), accepted) for accepted in tokens) > 0


class BearerAuth:
    """ASGI middleware: every path but EXEMPT_PATHS needs one of the tokens (none: no check)."""

    def __init__(self, app, tokens: tuple[str, ...]):
        self.app = app
        self.tokens = tuple(t.encode() for t in tokens)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.tokens and scope["path"] not in EXEMPT_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not token_accepted(header, self.tokens):
                response = error_json(
                    401, "missing or invalid bearer token (header 'Authorization: Bearer <token>')", None, "invalid_api_key",
                    headers={"www-authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class HttpApi:
    """The routes, on top of the orchestrator's servicer. `serving()`: what /health reports;
    `draining()`: new generations are refused (503), as the gRPC drain gate does."""

    def __init__(self, servicer: OrchestratorServicer, serving: Callable[[], bool], draining: Callable[[], bool],
                 model_name: str = "", tokens: tuple[str, ...] = (), max_body_bytes: int = 16 << 20):
        self.servicer = servicer
        self.serving = serving
        self.draining = draining
        self.model_name = model_name
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes
        self.generations: set[asyncio.Task] = set()
        self.created = int(time.time())

    def app(self):
        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error, Exception: self._internal_error})
        return BearerAuth(app, self.tokens)

    # plain routes

    def served_model(self) -> str:
        engine = self.servicer.engine
        if engine is None:
            raise Unavailable("the orchestrator is still connecting to the model services")
        return self.model_name or engine.target_info.model

    def _model_json(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "specdec"}

    async def models(self, request: Request) -> Response:
        try:
            return JSONResponse({"object": "list", "data": [self._model_json(self.served_model())]})
        except SpecdecError as error:
            return self._error(error, {})

    async def model(self, request: Request) -> Response:
        try:
            self._check_model(request.path_params["model"])
            return JSONResponse(self._model_json(self.served_model()))
        except SpecdecError as error:
            return self._error(error, {})

    async def health(self, request: Request) -> Response:
        if self.serving():
            return JSONResponse({"status": "SERVING"})
        return JSONResponse({"status": "NOT_SERVING"}, status_code=503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def _http_error(self, request: Request, error: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(error.status_code)
        return error_json(error.status_code, f"{error.detail}: {request.method} {request.url.path}", None, code,
                          headers=error.headers)

    async def _internal_error(self, request: Request, error: Exception) -> Response:
        log.error("internal error in %s %s", request.method, request.url.path, exc_info=error)
        return error_json(500, f"internal error: {type(error).__name__}: {error}", None, "internal")

    def _error(self, error: SpecdecError, params: dict[str, str]) -> Response:
        status, body, headers = error_content(error, params)
        return JSONResponse(body, status_code=status, headers=headers)

    def _check_model(self, model) -> None:
        served = self.served_model()
        if model is not None and model != served:
            message = f"the model {model!r} does not exist: this server serves {served!r} (GET /v1/models)"
            raise ModelNotFound(message, "model")

    # generations

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _read_json(self, request: Request) -> dict:
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise HTTPException(413, f"the request body exceeds {self.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ParameterError(f"the request body is not valid JSON: {error}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ParameterError("the request body must be a JSON object", None, "invalid_json")
        return body

    def _prepare(self, body: dict, chat: bool) -> tuple[ParsedRequest, str]:
        """The parsed request and the model name to answer with; errors counted in the metrics."""
        with metrics.count_errors(METRICS_SERVICE):
            if self.draining():
                raise Unavailable("the server is shutting down: retry on another replica")
            model = body.get("model")
            if model is not None and not isinstance(model, str):
                raise ParameterError("model must be a string", "model")
            self._check_model(model)
            parsed = parse_request(body, chat)
            if parsed.default_max_tokens:
                engine = self.servicer.engine
                prompt_tokens = len(engine.tokenize(parsed.generation))
                room = min(engine.max_new_tokens, engine.target_info.max_context - prompt_tokens)
                parsed = replace(parsed, generation=replace(parsed.generation, max_new_tokens=room))
            return parsed, self.served_model()

    def _start(self, parsed: ParsedRequest) -> list[Generation]:
        """One generation per choice, all running at once (the target batches their rounds)."""
        timeout = self.servicer.default_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        return [Generation(self.servicer.events(choice, deadline), self.generations) for choice in parsed.choices()]

    async def _generate(self, request: Request, chat: bool) -> Response:
        params: dict[str, str] = {}
        generations: list[Generation] = []
        try:
            parsed, model = self._prepare(await self._read_json(request), chat)
            params = parsed.params
            generations = self._start(parsed)
            if not parsed.stream:
                choices = await unless_disconnected(request, asyncio.gather(*(g.collect() for g in generations)))
                return JSONResponse(unary_body(choices, chat, model, self.servicer.engine.tokenizer))
            # The first events before the headers: errors at the start (validation, RESOURCE_EXHAUSTED
            # from a model service) get their HTTP status, which clients retry on, not an SSE error.
            firsts = await unless_disconnected(request, asyncio.gather(*(g.next() for g in generations)))
        except ClientGone:
            _cancel(generations)
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        except SpecdecError as error:
            _cancel(generations)
            return self._error(error, params)
        except Exception as error:  # noqa: BLE001 - the boundary where every error gets a status
            _cancel(generations)
            return await self._internal_error(request, error)
        except BaseException:
            _cancel(generations)
            raise
        chunks = sse_chunks(generations, firsts, chat, model, parsed.include_usage, params, self.servicer.engine.tokenizer)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)


# Serving --------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """The orchestrator handles SIGTERM and SIGINT itself (drain, then stop both ports)."""
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (OSError when it is taken)."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048, reuse_port=False)
    sock.setblocking(False)
    return sock


@dataclass
class RunningHttp:
    server: _Server
    task: asyncio.Task
    api: HttpApi
    port: int

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop listening; requests still running get `grace_s`, then they and their generations
        are cancelled (the generations end their sessions)."""
        self.server.config.timeout_graceful_shutdown = grace_s
        self.server.should_exit = True
        await self.task
        for task in list(self.api.generations):
            task.cancel()
        await asyncio.gather(*self.api.generations, return_exceptions=True)


async def serve(api: HttpApi, host: str, port: int, tls_cert_file: str = "", tls_key_file: str = "",
                tls_client_ca_file: str = "", log_level: str = "INFO") -> RunningHttp:
    """Serve `api` on host:port in this event loop (TLS when a certificate is given; with a client
    CA, clients must present a certificate it signed); returns once it listens."""
    if bool(tls_cert_file) != bool(tls_key_file):
        raise ValueError("--tls-cert-file and --tls-key-file go together")
    sock = bind(host, port)
    config = uvicorn.Config(
        api.app(),
        lifespan="off",
        log_config=None,  # the process's logging (python -m orchestrator sets it up) stays as it is
        log_level=log_level.lower(),
        access_log=False,
        http="h11",
        ws="none",
        server_header=False,
        ssl_certfile=tls_cert_file or None,
        ssl_keyfile=tls_key_file or None,
        ssl_ca_certs=tls_client_ca_file or None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca_file else ssl.CERT_NONE,
    )
    try:
        config.load()
    except BaseException:
        sock.close()
        raise
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            sock.close()
            task.result()
            raise RuntimeError("the HTTP server stopped while starting")
        await asyncio.sleep(0.01)
    bound = sock.getsockname()[1]
    log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if tls_cert_file else "http", host, bound)
    return RunningHttp(server, task, api, bound)
