"""A TCP proxy that delays every byte by a fixed one-way latency in each direction: a stand-in for
`tc netem` (which needs a kernel module this kind of container lacks) between the orchestrator
and a model service.

    proxy = DelayProxy("127.0.0.1:50051", one_way_s=0.005)   # 10 ms round-trip time
    await proxy.start()                                     # then dial proxy.address

Latency, not bandwidth: each chunk read from one side is written to the other `one_way_s` after
it arrived, in order, without holding up the chunks behind it, so a stream of messages is shifted
in time, not serialized behind one another. `one_way_s` may change while connections are open
(the benchmarks sweep it on one stack); chunks already in flight keep their delivery time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from harness.loop import LoopThread

CHUNK_BYTES = 64 << 10


class DelayProxy:
    """Listens on `listen_host`, port 0 (a free one), and forwards each connection to `upstream`."""

    def __init__(self, upstream: str, one_way_s: float = 0.0, listen_host: str = "127.0.0.1"):
        self.upstream_host, upstream_port = upstream.rsplit(":", 1)
        self.upstream_port = int(upstream_port)
        self.one_way_s = one_way_s
        self.listen_host = listen_host
        self._server: asyncio.base_events.Server | None = None
        self._pipes: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> "DelayProxy":
        self._server = await asyncio.start_server(self._connect, self.listen_host, 0)
        return self

    async def stop(self) -> None:
        self._server.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    async def _connect(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            client_writer.close()  # the service is down: the caller sees a refused connection's effect
            return
        pipes = [
            asyncio.create_task(self._pipe(client_reader, upstream_writer)),
            asyncio.create_task(self._pipe(upstream_reader, client_writer)),
        ]
        self._pipes.update(pipes)
        # When either side closes, close both: the proxy holds no half-open connection.
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        self._pipes.difference_update(pipes)
        for writer in (client_writer, upstream_writer):
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy reader to writer, each chunk `one_way_s` after it was read."""
        in_flight: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(in_flight, writer))
        try:
            while chunk := await reader.read(CHUNK_BYTES):
                in_flight.put_nowait((time.monotonic() + self.one_way_s, chunk))
            in_flight.put_nowait((time.monotonic() + self.one_way_s, b""))  # end of stream, delayed too
            await deliver
        finally:
            deliver.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await deliver

    @staticmethod
    async def _deliver(in_flight: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        while True:
            due, chunk = await in_flight.get()
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if not chunk:
                return
            writer.write(chunk)
            await writer.drain()


class ProxyThread:
    """Delay proxies served by an event loop in a background thread, for synchronous callers
    (the benchmarks and the subprocess tests)."""

    def __init__(self):
        self.loop = LoopThread()
        self.proxies: list[DelayProxy] = []

    def add(self, upstream: str, one_way_s: float = 0.0, listen_host: str = "127.0.0.1") -> DelayProxy:
        proxy = self.loop.run(DelayProxy(upstream, one_way_s, listen_host).start())
        self.proxies.append(proxy)
        return proxy

    def set_rtt(self, rtt_ms: float) -> None:
        """The same round-trip time on every proxy, half of it each way."""
        for proxy in self.proxies:
            proxy.one_way_s = rtt_ms / 2000

    def close(self) -> None:
        for proxy in self.proxies:
            self.loop.run(proxy.stop())
        self.loop.close()
