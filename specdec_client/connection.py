"""How the clients reach the orchestrator: the channel (plaintext, TLS or mutual TLS, message
limits), the call options (deadline, bearer token), and gRPC errors turned into RequestError.

Boundary: shared by the sync and asyncio clients (grpc and grpc.aio offer the same channel
constructors); knows gRPC but not the specdec messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2

DEFAULT_ADDRESS = "127.0.0.1:50050"  # the orchestrator's default port on this host
_DETAILS_KEY = "grpc-status-details-bin"  # where servers put a google.rpc.Status with details


def _read(pem: bytes | str | os.PathLike | None) -> bytes | None:
    """PEM data as bytes; a str or path names a file."""
    if pem is None or isinstance(pem, bytes):
        return pem
    with open(pem, "rb") as file:
        return file.read()


class _Connection:
    """The channel and the per-call arguments of one client; see Client for the parameters."""

    def __init__(
        self,
        grpc_module,
        address: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike | None = None,
        certificate_chain: bytes | str | os.PathLike | None = None,
        private_key: bytes | str | os.PathLike | None = None,
        timeout: float | None = 600.0,
        max_message_mb: int = 16,
        channel_options: Sequence[tuple[str, object]] = (),
    ):
        self.timeout = timeout
        # Sent as call metadata rather than call credentials, which gRPC refuses on plaintext
        # channels; beyond loopback, use TLS so the token is not readable on the wire.
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_send_message_length", max_message_mb << 20),
            ("grpc.max_receive_message_length", max_message_mb << 20),
            *channel_options,
        ]
        if tls or root_certificates is not None or certificate_chain is not None:
            credentials = grpc.ssl_channel_credentials(_read(root_certificates), _read(private_key), _read(certificate_chain))
            self.channel = grpc_module.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc_module.insecure_channel(address, options=options)

    def call_args(self, timeout: float | None) -> dict:
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self.metadata}


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class RequestError(Exception):
    """A call that ended with a status other than OK.

    `code` is the grpc.StatusCode (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE,
    DEADLINE_EXCEEDED, UNAUTHENTICATED, ...); `field_violations` name the request fields at fault
    (from a google.rpc.BadRequest detail) and `retry_after_s` says when retrying may succeed
    (from a google.rpc.RetryInfo), when the server sent them. `generated_text`: a request whose
    target was lost on every replica (UNAVAILABLE, reason OUTPUT_INCOMPLETE) keeps the text it had
    generated here; None otherwise.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_after_s: float | None = None,
        generated_text: str | None = None,
    ):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field_violations = field_violations
        self.retry_after_s = retry_after_s
        self.generated_text = generated_text

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> RequestError:
        """From a sync or asyncio gRPC error (both are calls with code, details and trailers)."""
        violations, retry_after_s, generated_text = [], None, None
        for key, value in error.trailing_metadata() or ():
            if key != _DETAILS_KEY:
                continue
            for detail in status_pb2.Status.FromString(value).details:
                bad_request, retry, info = error_details_pb2.BadRequest(), error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
                if detail.Unpack(bad_request):
                    violations += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
                elif detail.Unpack(retry):
                    retry_after_s = retry.retry_delay.ToTimedelta().total_seconds()
                elif detail.Unpack(info) and info.reason == "OUTPUT_INCOMPLETE":
                    generated_text = info.metadata.get("generated_text")
        return cls(error.code(), error.details() or "", tuple(violations), retry_after_s, generated_text)
