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

The modules: parameters.py (an OpenAI request body -> GenerationRequest; domain errors -> OpenAI's
error shape and HTTP status), responses.py (unary bodies and server-sent event chunks, usage, the
`specdec_stats` extension) and app.py (the Starlette routes, bearer tokens, the task of each
generation, the uvicorn server with its TLS, start and stop).
"""
