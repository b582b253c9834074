"""One bidirectional stream per session for its rounds (TargetService.VerifyStream,
DraftService.ProposeStream): a round is one write and one read on the session's stream instead of
a unary call, which spares the call's set-up (a new HTTP/2 stream, headers, trailers) on both
sides. The services answer each message as they would the unary call, batched alike.

Two rules keep a stream's answers matched to their questions:
- exchanges on one stream run one at a time, in order;
- an exchange runs in its own task, which its caller only waits for: cancelling a read would
  cancel the whole stream, so when a caller gives up (a pipelined Propose whose guess failed),
  its exchange still completes and its answer is dropped. A caller's timeout, or any error, ends
  the stream; the session's next round opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Callable

import grpc

from specdec.errors import Upstream


def upstream_error(code: grpc.StatusCode, details: str | None, role: str) -> Upstream:
    """The domain error of a call to a model service that ended with `code`."""
    if code == grpc.StatusCode.UNAVAILABLE:  # down, restarting or unreachable: say so plainly
        return Upstream("UNAVAILABLE", f"the {role} service is unavailable: {details}")
    if code == grpc.StatusCode.OK:  # a round stream the service closed (it is stopping)
        return Upstream("UNAVAILABLE", f"the {role} service ended the session's stream")
    return Upstream(code.name, f"{role} service: {details}")


@dataclass
class _Stream:
    call: grpc.aio.StreamStreamCall
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    exchanges: int = 0  # begun and not yet answered


class SessionStreams:
    """The open round streams of one model service's sessions, by session id. `open_stream()`
    starts a stream (a stub's VerifyStream or ProposeStream)."""

    def __init__(self, open_stream: Callable[[], grpc.aio.StreamStreamCall], role: str):
        self._open = open_stream
        self._role = role
        self._streams: dict[str, _Stream] = {}

    def __len__(self) -> int:
        return len(self._streams)

    async def exchange(self, session_id: str, request, timeout: float | None):
        """Send `request` on the session's stream (opened on first use) and return the answer."""
        stream = self._streams.get(session_id)
        if stream is None:
            stream = self._streams[session_id] = _Stream(self._open())
        stream.exchanges += 1
        task = asyncio.ensure_future(self._exchange(session_id, stream, request))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a dropped answer's error is nobody's
        # asyncio.wait leaves `task` running when its caller is cancelled or times out; wait_for
        # would cancel it, and Python 3.11's wait_for drops a cancellation that arrives as the
        # answer does (a client's disconnect went unheard)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            self._end(session_id, stream)
            raise Upstream("DEADLINE_EXCEEDED", f"{self._role} service: no answer within {timeout:.3g} s")
        return task.result()

    async def _exchange(self, session_id: str, stream: _Stream, request):
        async with stream.lock:
            try:
                await stream.call.write(request)
                response = await stream.call.read()
            except grpc.aio.AioRpcError as error:
                self._forget(session_id, stream)
                raise upstream_error(error.code(), error.details(), self._role) from error
            except asyncio.InvalidStateError:  # the stream had ended before this write: its status says why
                self._forget(session_id, stream)
                raise upstream_error(await stream.call.code(), await stream.call.details(), self._role) from None
            except BaseException:
                self._end(session_id, stream)
                raise
            finally:
                stream.exchanges -= 1
            if response is grpc.aio.EOF:
                self._forget(session_id, stream)
                raise upstream_error(grpc.StatusCode.OK, None, self._role)
            return response

    def close(self, session_id: str) -> None:
        """The session ended: half-close its stream (the service's handler returns), or cancel it
        when an exchange is still under way."""
        stream = self._streams.pop(session_id, None)
        if stream is None:
            return
        if stream.exchanges:
            stream.call.cancel()
            return
        closing = asyncio.ensure_future(stream.call.done_writing())
        closing.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _end(self, session_id: str, stream: _Stream) -> None:
        stream.call.cancel()
        self._forget(session_id, stream)

    def _forget(self, session_id: str, stream: _Stream) -> None:
        with contextlib.suppress(KeyError):
            if self._streams[session_id] is stream:
                del self._streams[session_id]
