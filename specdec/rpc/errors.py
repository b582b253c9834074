"""The one place where errors become gRPC statuses: an interceptor around every specdec.* method.

- A request that does not parse as its message (corrupt wire format, invalid UTF-8 in a string
  field) ends with INVALID_ARGUMENT. grpc.aio would answer UNKNOWN and log a traceback per call,
  which lets any client fill the logs.
- A domain error (specdec/errors.py) ends with its status, a BadRequest naming the field when it
  has one, and a RetryInfo when retrying later may succeed.
- Anything unexpected is logged and ends with INTERNAL instead of an opaque UNKNOWN.

Servicers therefore only convert and delegate; they never build a status themselves. Health and
reflection keep grpc's own handling.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from specdec.errors import OutputIncomplete, ResourceExhausted, SpecdecError

log = logging.getLogger(__name__)

# Messages may quote what the request sent (a session id of thousands of characters); a status
# travels in trailing metadata, where the message and the BadRequest description together must
# stay under the 8 KiB a client accepts by default, or the client sees RESOURCE_EXHAUSTED instead.
MAX_MESSAGE_CHARS = 1000


def bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 40] + f"... ({len(message)} characters in all)"


def error_status(error: SpecdecError) -> grpc.Status:
    """The gRPC status of a domain error, with its details."""
    message = bounded(error.message)
    status = status_pb2.Status(code=getattr(code_pb2, error.code_name), message=message)
    if error.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=message)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    if isinstance(error, OutputIncomplete):
        metadata = {"generated_tokens": str(len(error.token_ids)), "generated_text": bounded(error.text)}
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason="OUTPUT_INCOMPLETE", domain="specdec.v1", metadata=metadata))
    if isinstance(error, ResourceExhausted):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)


async def _fail(context, method: str, error: Exception) -> None:
    if isinstance(error, SpecdecError):
        await context.abort_with_status(error_status(error))
    log.error("internal error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")


class ErrorStatus(grpc.aio.ServerInterceptor):
    """Parses requests and turns every error of our methods into its status (see the module's
    docstring). Client-streaming alone is not wrapped: no specdec method has that form."""

    PREFIX = "/specdec."

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.PREFIX):
            return handler
        if handler.request_streaming and not handler.response_streaming:
            return handler
        decode, method = handler.request_deserializer, details.method

        async def parsed(raw: bytes, context):
            try:
                return decode(raw)
            except DecodeError as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message: {error}")

        async def responses(produce, context):
            try:
                async for response in produce:
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - the boundary where every error gets a status
                await _fail(context, method, error)

        if handler.stream_stream:

            async def bidirectional(raw_requests, context):
                async def requests():
                    async for raw in raw_requests:
                        yield await parsed(raw, context)

                async for response in responses(handler.stream_stream(requests(), context), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(bidirectional, None, handler.response_serializer)

        if handler.unary_stream:

            async def stream(raw, context):
                request = await parsed(raw, context)
                async for response in responses(handler.unary_stream(request, context), context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(stream, None, handler.response_serializer)

        async def unary(raw, context):
            request = await parsed(raw, context)
            try:
                return await handler.unary_unary(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001
                await _fail(context, method, error)

        return grpc.unary_unary_rpc_method_handler(unary, None, handler.response_serializer)
