"""The asyncio client (grpc.aio): `AsyncClient.generate` and `AsyncClient.generate_stream`."""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from specdec.v1 import orchestrator_pb2_grpc
from specdec_client.connection import DEFAULT_ADDRESS, RequestError, _Connection
from specdec_client.types import Completion, Delta, Request, as_request


class AsyncClient:
    """A connection to the orchestrator for asyncio code; the same parameters as Client. Create
    it inside the event loop that uses it.

        async with AsyncClient("127.0.0.1:50050", token="...") as client:
            completion = await client.generate(Request(prompt="def fib(n):", max_new_tokens=64))
            async for delta in client.generate_stream("Once upon a time"):
                print(delta.text, end="", flush=True)

    Many requests may run concurrently on one client (asyncio.gather); methods raise RequestError
    for any status other than OK.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, **options):
        self._connection = _Connection(grpc.aio, address, **options)
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._connection.channel)

    async def generate(self, request: Request | str, *, timeout: float | None = None) -> Completion:
        """The whole generation at once. A str is a raw prompt with default settings."""
        try:
            response = await self._stub.Generate(as_request(request).to_proto(), **self._connection.call_args(timeout))
        except grpc.RpcError as error:
            raise RequestError.from_rpc_error(error) from error
        return Completion.from_proto(response)

    async def generate_stream(self, request: Request | str, *, timeout: float | None = None) -> AsyncIterator[Delta]:
        """The generation as it is produced, as in Client.generate_stream; leaving the `async for`
        early (or cancelling the task) cancels the call and frees the server's sessions."""
        call = self._stub.GenerateStream(as_request(request).to_proto(), **self._connection.call_args(timeout))
        try:
            async for message in call:
                yield Delta.from_proto(message)
        except grpc.RpcError as error:
            raise RequestError.from_rpc_error(error) from error
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._connection.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
