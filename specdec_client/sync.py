"""The blocking client: `Client.generate` and `Client.generate_stream` over one gRPC channel."""

from __future__ import annotations

from typing import Iterator

import grpc

from specdec.v1 import orchestrator_pb2_grpc
from specdec_client.connection import DEFAULT_ADDRESS, RequestError, _Connection
from specdec_client.types import Completion, Delta, Request, as_request


class Client:
    """A connection to the orchestrator; thread-safe, meant to be created once and reused.

        with Client("127.0.0.1:50050") as client:
            print(client.generate("The capital of France is").text)
            for delta in client.generate_stream(Request(messages=[("user", "Hi!")], max_new_tokens=64)):
                print(delta.text, end="", flush=True)

    Parameters (keyword-only after `address`):
      token: sent as `authorization: Bearer <token>` on every call (the orchestrator's
        --auth-token-file); use TLS beyond loopback.
      tls: TLS with the system's root certificates. root_certificates: PEM bytes or a file path
        of the CAs to trust (implies TLS). certificate_chain, private_key: this client's
        certificate and key for mutual TLS.
      timeout: default deadline of each call in seconds (None: no deadline; the server then
        applies its --request-timeout-s); every method also takes its own `timeout`.
      max_message_mb, channel_options: gRPC channel settings.

    Methods raise RequestError for any status other than OK.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, **options):
        self._connection = _Connection(grpc, address, **options)
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._connection.channel)

    def generate(self, request: Request | str, *, timeout: float | None = None) -> Completion:
        """The whole generation at once. A str is a raw prompt with default settings."""
        try:
            response = self._stub.Generate(as_request(request).to_proto(), **self._connection.call_args(timeout))
        except grpc.RpcError as error:
            raise RequestError.from_rpc_error(error) from error
        return Completion.from_proto(response)

    def generate_stream(self, request: Request | str, *, timeout: float | None = None) -> Iterator[Delta]:
        """The generation as it is produced: text deltas (never a split character, never a part
        of a stop string), the last one with finish_reason and stats. Stopping the iteration
        early cancels the call, which frees the request's sessions on the server at once."""
        call = self._stub.GenerateStream(as_request(request).to_proto(), **self._connection.call_args(timeout))
        try:
            for message in call:
                yield Delta.from_proto(message)
        except grpc.RpcError as error:
            raise RequestError.from_rpc_error(error) from error
        finally:
            call.cancel()

    def close(self) -> None:
        self._connection.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
