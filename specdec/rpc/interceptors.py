"""Server interceptors that refuse calls before any servicer runs: bearer-token authentication
and the drain gate of graceful shutdown."""

from __future__ import annotations

import hmac

import grpc


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
    """A handler of the same kind as `handler` (unary, server-streaming or bidirectional) that
    ends the call with `code` without running the servicer."""

    async def deny(request, context):
        await context.abort(code, message)

    async def deny_stream(request, context):
        await deny(request, context)
        yield  # never reached: makes this an async generator, as streaming handlers are

    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(deny_stream, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)


def read_tokens(path: str) -> tuple[str, ...]:
    """Accepted bearer tokens, one per line of `path` (blank lines and # comments ignored)."""
    if not path:
        return ()
    with open(path) as lines:
        tokens = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise ValueError(f"{path} holds no token")
    return tokens
