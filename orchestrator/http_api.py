"""The OpenAI-compatible HTTP API of the orchestrator (docs/http-api.md): POST /v1/chat/completions
and /v1/completions, unary or streamed as server-sent events, GET /v1/models, GET /health and
GET /metrics, on `--http-port` beside the gRPC port.

Why a port of the orchestrator and not a gateway service in front of it: a request goes straight
to the same GenerationEngine.stream the gRPC methods call (through OrchestratorServicer.events, so
it is counted, drained and recorded in the metrics exactly as they are), in the same process and
event loop. There is no extra network hop, no second copy of the request's validation (the
engine's InvalidArgument errors, with the field they name, become HTTP 400 naming the OpenAI
parameter), no second service to deploy, scale, secure and keep in step with the proto, and the
output is the engine's own: exact under speculation because nothing here touches a token. The HTTP
port takes the gRPC port's settings: the same bearer tokens (--auth-token-file), the same TLS
certificate and client CA (--tls-*), the same drain on SIGTERM. uvicorn runs inside the
orchestrator's asyncio loop (`uvicorn.Server.serve()` as a task, on a socket bound here so that a
busy port fails start-up like the gRPC port does); the orchestrator, not uvicorn, handles signals.

Each generation runs in a task of its own (`Generation`), fed to the response through a queue: a
client that disconnects (or a unary request whose client gives up) cancels that task once, and the
engine's clean-up ends both sessions. Inside Starlette's streaming response the generation would
be cancelled by anyio's cancel scope, which cancels again at every await and could cut that
clean-up short.

Parameters: the ones this engine implements are mapped to a GenerationRequest; commonly sent ones
it does not implement yet are accepted at their no-op values (`frequency_penalty: 0`, `logprobs:
false`, ...) and refused with 400 naming the parameter otherwise; parameters that change nothing
about the output (`user`, `metadata`, ...) are accepted and ignored; anything else is an unknown
parameter, 400. Nothing is ignored silently that would change what the model generates.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from orchestrator.generation import GenerationEvent, GenerationRequest
from orchestrator.servicer import METRICS_SERVICE, OrchestratorServicer
from orchestrator.stats import GenerationStats
from specdec import metrics
from specdec.errors import InvalidArgument, SpecdecError, Unavailable
from specdec.v1 import orchestrator_pb2

log = logging.getLogger(__name__)

# gRPC status code name -> HTTP status and OpenAI error type
STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNIMPLEMENTED": (501, "server_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
}
FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop"}
STATS_FIELDS = tuple(f.name for f in orchestrator_pb2.GenerationStats.DESCRIPTOR.fields)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
EXEMPT_PATHS = ("/health", "/metrics")  # open without a token, as gRPC health checks are
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ParameterError(InvalidArgument):
    """A request parameter this API refuses; `openai_code` is the error's `code`."""

    def __init__(self, message: str, param: str, openai_code: str = "invalid_value"):
        super().__init__(message, param)
        self.openai_code = openai_code


class ModelNotFound(SpecdecError):
    code_name = "NOT_FOUND"
    openai_code = "model_not_found"


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def error_json(status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind or _kind(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _kind(status: int) -> str:
    fallback = "server_error" if status >= 500 else "invalid_request_error"
    return next((kind for code, kind in STATUS.values() if code == status), fallback)


def error_content(error: SpecdecError, params: dict[str, str]) -> tuple[int, dict, dict[str, str]]:
    """HTTP status, OpenAI error body and headers of a domain error; `params` renames the
    engine's field names to the request's parameter names."""
    status, kind = STATUS.get(error.code_name, (500, "server_error"))
    param = None
    if error.field:
        head, dot, rest = error.field.partition(".")
        base, bracket, index = head.partition("[")
        param = params.get(base, base) + bracket + index + dot + rest
    code = getattr(error, "openai_code", error.code_name.lower())
    headers = {}
    if error.code_name == "RESOURCE_EXHAUSTED":
        headers["retry-after"] = str(max(1, math.ceil(getattr(error, "retry_after_s", 1.0))))
    return status, {"error": {"message": error.message, "type": kind, "param": param, "code": code}}, headers


def stats_json(stats: GenerationStats) -> dict:
    """`specdec_stats`: the fields of GenerationStats in orchestrator.proto, same names."""
    return {name: (list(value) if isinstance(value := getattr(stats, name), list) else value) for name in STATS_FIELDS}


def usage_json(stats: GenerationStats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
    }


# Parameters -----------------------------------------------------------------------------------


def _no_value(value) -> bool:
    return value is None


# Parameters of later parts (issue 15) and of other servers: accepted at the value that changes
# nothing (or null), refused otherwise. name -> (test of a no-op value, that value as documented)
NO_OPS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "frequency_penalty": (lambda v: v == 0, "0"),
    "presence_penalty": (lambda v: v == 0, "0"),
    "repetition_penalty": (lambda v: v == 1, "1"),
    "min_p": (lambda v: v == 0, "0"),
    "logit_bias": (lambda v: v == {}, "{}"),
    "stop_token_ids": (lambda v: v == [], "[]"),
    "ignore_eos": (lambda v: v is False, "false"),
    "min_tokens": (lambda v: v == 0, "0"),
    "include_stop_str_in_output": (lambda v: v is False, "false"),
    "skip_special_tokens": (lambda v: v is True, "true"),
    "response_format": (lambda v: v == {"type": "text"}, '{"type": "text"}'),
    "tools": (lambda v: v == [], "[]"),
    "functions": (lambda v: v == [], "[]"),
    "tool_choice": (lambda v: v in ("none", "auto"), '"none"'),
    "function_call": (lambda v: v in ("none", "auto"), '"none"'),
    "modalities": (lambda v: v == ["text"], '["text"]'),
    "audio": (_no_value, "null"),
    "prediction": (_no_value, "null"),
    "reasoning_effort": (_no_value, "null"),
    "verbosity": (_no_value, "null"),
    "web_search_options": (_no_value, "null"),
}
CHAT_NO_OPS = {**NO_OPS, "logprobs": (lambda v: v is False, "false"), "top_logprobs": (lambda v: v == 0, "0")}
COMPLETION_NO_OPS = {
    **NO_OPS,
    "logprobs": (_no_value, "null"),
    "echo": (lambda v: v is False, "false"),
    "best_of": (lambda v: v == 1, "1"),
    "suffix": (lambda v: v == "", '""'),
}
# Parameters that do not change the output: accepted, whatever their value, and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"})
COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options",
                    "num_speculative_tokens"})
CHAT_PARAMETERS = COMMON | {"messages", "max_completion_tokens"}
COMPLETION_PARAMETERS = COMMON | {"prompt"}
MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "refusal", "function_call"}


def _integer(body: dict, name: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(f"{name} must be an integer, got {json.dumps(value)}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(f"{name} must be a number, got {json.dumps(value)}", name)
    return float(value)


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ParameterError(f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def _check_names(body: dict, known: frozenset, no_ops: dict) -> None:
    for name, value in body.items():
        if name in known or name in IGNORED:
            continue
        if name in no_ops:
            accepts, default = no_ops[name]
            if value is not None and not accepts(value):
                raise ParameterError(
                    f"{name}={json.dumps(value)} is not supported yet: it would change the output. "
                    f"Leave it out or set it to {default}",
                    name, "unsupported_parameter",
                )
            continue
        raise ParameterError(f"unknown parameter {name!r}", name, "unknown_parameter")


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise ParameterError("stop must be a string or a list of strings", "stop")


def _message_content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise ParameterError(
                    f"content parts must be text parts ({{\"type\": \"text\", \"text\": ...}}), got type {json.dumps(kind)}",
                    f"{where}.content[{index}]", "unsupported_parameter",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise ParameterError("content must be a string or a list of text parts", f"{where}.content")


def _messages(body: dict) -> tuple[tuple[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ParameterError("messages must be a non-empty list of messages", "messages")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ParameterError("each message must be an object with role and content", where)
        for key, value in message.items():
            if key not in MESSAGE_KEYS:
                raise ParameterError(f"unknown message field {key!r}", f"{where}.{key}", "unknown_parameter")
            if key in ("tool_calls", "function_call") and value:
                raise ParameterError("tool calls are not supported", f"{where}.{key}", "unsupported_parameter")
        role = message.get("role")
        if not isinstance(role, str):
            raise ParameterError("role must be a string", f"{where}.role")
        # OpenAI's newer name for the system role; chat templates know "system"
        parsed.append(("system" if role == "developer" else role, _message_content(message.get("content"), where)))
    return tuple(parsed)


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise ParameterError("one prompt per request: send a string (or a list of one string)", "prompt", "unsupported_parameter")
    if isinstance(prompt, list):
        raise ParameterError("token-id prompts are not supported: send the prompt as a string", "prompt", "unsupported_parameter")
    raise ParameterError("prompt must be a string", "prompt")


@dataclass(frozen=True)
class ParsedRequest:
    generation: GenerationRequest
    stream: bool
    include_usage: bool
    params: dict[str, str]  # the engine's field names -> this request's parameter names
    default_max_tokens: bool  # max_tokens left out: as many as the context holds (chat)


def parse_request(body: dict, chat: bool) -> ParsedRequest:
    """A GenerationRequest from an OpenAI request body; ParameterError (400) for what it cannot map."""
    _check_names(body, CHAT_PARAMETERS if chat else COMPLETION_PARAMETERS, CHAT_NO_OPS if chat else COMPLETION_NO_OPS)
    n = _integer(body, "n", 1)
    if n != 1:
        raise ParameterError(f"n must be 1 (one choice per request), got {n}", "n", "unsupported_parameter")
    max_tokens = _integer(body, "max_tokens")
    max_param = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:  # the newer name wins
        max_param, max_tokens = "max_completion_tokens", _integer(body, "max_completion_tokens")
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 1 << 64:
        raise ParameterError(f"seed must be in [0, 2^64), got {seed}", "seed")
    top_k = _integer(body, "top_k", 0)
    stream = _boolean(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats", "include_obfuscation"}:
        raise ParameterError("stream_options takes include_usage", "stream_options")
    include_usage = _boolean(options, "include_usage")
    if options.get("continuous_usage_stats"):
        raise ParameterError(
            "continuous_usage_stats is not supported", "stream_options.continuous_usage_stats", "unsupported_parameter"
        )
    generation = GenerationRequest(
        prompt="" if chat else _prompt(body),
        messages=_messages(body) if chat else (),
        max_new_tokens=max_tokens if max_tokens is not None else (0 if chat else COMPLETIONS_DEFAULT_MAX_TOKENS),
        temperature=_number(body, "temperature", 1.0),  # OpenAI's default: sampling at temperature 1
        top_p=_number(body, "top_p", 1.0),
        top_k=0 if top_k == -1 else top_k,  # -1: disabled, as vLLM spells it
        seed=seed,
        stop=_stops(body),
        num_speculative_tokens=_integer(body, "num_speculative_tokens"),
    )
    params = {"max_new_tokens": max_param, "prompt": "messages" if chat else "prompt"}
    return ParsedRequest(generation, stream, include_usage, params, chat and max_tokens is None)


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


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


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

    def _start(self, parsed: ParsedRequest) -> Generation:
        timeout = self.servicer.default_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        return Generation(self.servicer.events(parsed.generation, deadline), self.generations)

    async def _generate(self, request: Request, chat: bool) -> Response:
        params: dict[str, str] = {}
        generation = None
        try:
            parsed, model = self._prepare(await self._read_json(request), chat)
            params = parsed.params
            generation = self._start(parsed)
            if not parsed.stream:
                events = await unless_disconnected(request, generation.collect())
                return JSONResponse(self._whole(events, chat, model))
            # The first event before the headers: errors at the start (validation, RESOURCE_EXHAUSTED
            # from a model service) get their HTTP status, which clients retry on, not an SSE error.
            first = await unless_disconnected(request, generation.next())
        except ClientGone:
            generation.cancel()
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        except SpecdecError as error:
            if generation is not None:
                generation.cancel()
            return self._error(error, params)
        except Exception as error:  # noqa: BLE001 - the boundary where every error gets a status
            if generation is not None:
                generation.cancel()
            return await self._internal_error(request, error)
        except BaseException:
            if generation is not None:
                generation.cancel()
            raise
        chunks = self._chunks(generation, first, chat, model, parsed.include_usage, params)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)

    def _whole(self, events: list[GenerationEvent], chat: bool, model: str) -> dict:
        text, last = "".join(e.text for e in events), events[-1]
        choice: dict = {"index": 0}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice |= {"logprobs": None, "finish_reason": FINISH_REASONS[last.finish_reason]}
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
            "choices": [choice],
            "usage": usage_json(last.stats),
            "specdec_stats": stats_json(last.stats),
        }

    async def _chunks(self, generation: Generation, event: GenerationEvent, chat: bool, model: str, include_usage: bool,
                      params: dict[str, str]) -> AsyncIterator[bytes]:
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }

        def chunk(text: str | None, finish_reason: str | None = None, role: bool = False, **extra) -> bytes:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            choice |= {"logprobs": None, "finish_reason": finish_reason}
            return _sse(head | {"choices": [choice]} | ({"usage": None} if include_usage else {}) | extra)

        try:
            if chat:
                yield chunk("", role=True)
            while True:
                if event.text:
                    yield chunk(event.text)
                if event.finish_reason is not None:
                    break
                event = await generation.next()
            stats = event.stats
            yield chunk(None if chat else "", FINISH_REASONS[event.finish_reason], specdec_stats=stats_json(stats))
            if include_usage:
                yield _sse(head | {"choices": [], "usage": usage_json(stats)})
        except SpecdecError as error:  # after the headers: the error is the stream's last event
            _, body, _ = error_content(error, params)
            yield _sse(body)
        except Exception as error:  # noqa: BLE001
            log.error("internal error in a streamed generation", exc_info=error)
            yield _sse({"error": {"message": f"internal error: {type(error).__name__}: {error}", "type": "server_error",
                                  "param": None, "code": "internal"}})
        finally:
            generation.cancel()  # a no-op once it finished; frees both sessions when the client went away
        yield _sse("[DONE]")


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
