"""specdec_client: a Python client library for the specdec orchestrator (`specdec.v1.Orchestrator`).

    from specdec_client import Client, Request

    with Client("127.0.0.1:50050") as client:
        completion = client.generate(Request(messages=[("user", "Write a haiku about rivers.")], max_new_tokens=64))
        print(completion.text, completion.finish_reason, completion.stats.acceptance_rate)
        for delta in client.generate_stream("def fibonacci(n):"):
            print(delta.text, end="", flush=True)

`Client` blocks; `AsyncClient` is the same API for asyncio (`await client.generate(...)`,
`async for delta in client.generate_stream(...)`). Both take a deadline, a bearer token and TLS
settings; results are typed (`Completion`, `Delta`, `Stats`); errors are `RequestError` with the
gRPC status code and the request fields at fault.

Boundary: this package talks to the orchestrator only, over its public protocol; it needs grpcio,
protobuf and the generated messages in `specdec.v1` (the `specdec` package's `__init__` imports
nothing, so no model code is loaded).
"""

from specdec_client.aio import AsyncClient
from specdec_client.connection import FieldViolation, RequestError
from specdec_client.sync import Client
from specdec_client.types import Completion, Delta, FinishReason, Request, Stats, TokenLogprobs

__all__ = ["AsyncClient", "Client", "Completion", "Delta", "FieldViolation", "FinishReason", "Request", "RequestError", "Stats",
           "TokenLogprobs"]
