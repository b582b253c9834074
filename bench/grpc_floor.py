"""What one gRPC call costs on this machine without our services: a grpc.aio unary Verify between
two processes on loopback, answered by an echo servicer (a fixed verdict), through a bare
`grpc.aio.server` and through our `create_server` (interceptors, health, reflection), answered at
once or after `--compute-ms` of work in a worker thread (as the model services compute) or on the
event-loop thread; and one Verify message on an open VerifyStream (as the orchestrator's round
streams send them). The floor under the per-round transport the timeline reports (bench.timeline).

    python -m bench.grpc_floor [--calls 300] [--compute-ms 15]

Prints the median and 10th-90th percentile round trip of each setting.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from harness.probes import free_port
from specdec.v1 import target_pb2, target_pb2_grpc

SETTINGS = {  # name -> (our server?, where the compute runs, on a stream?)
    "bare server, immediate answer": (False, "", False),
    "our server, immediate answer": (True, "", False),
    "our server, compute in a worker thread": (True, "worker", False),
    "our server, compute on the event-loop thread": (True, "loop", False),
    "our server, stream message, immediate answer": (True, "", True),
    "our server, stream message, compute in a worker thread": (True, "worker", True),
    "our server, stream message, compute on the event-loop thread": (True, "loop", True),
}


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Echo(target_pb2_grpc.TargetServiceServicer):
    def __init__(self, compute_s: float, where: str):
        self.compute_s, self.where, self.pool = compute_s, where, ThreadPoolExecutor(1)

    async def Verify(self, request, context):
        if self.where == "worker":
            await asyncio.get_running_loop().run_in_executor(self.pool, _spin, self.compute_s)
        elif self.where == "loop":
            _spin(self.compute_s)
        return target_pb2.VerifyResponse(results=[target_pb2.VerifyResult(accepted=0, next_token=5)])

    async def VerifyStream(self, requests, context):
        async for request in requests:
            yield await self.Verify(request, context)


async def serve(port: int, ours: bool, compute_s: float, where: str) -> None:
    register = lambda server: target_pb2_grpc.add_TargetServiceServicer_to_server(Echo(compute_s, where), server)  # noqa: E731
    if ours:
        from specdec.rpc.server import create_server

        server = create_server(f"127.0.0.1:{port}", register, ("specdec.v1.TargetService",))
    else:
        server = grpc.aio.server()
        register(server)
        server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await asyncio.Event().wait()


async def round_trips(port: int, calls: int, stream: bool) -> list[float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = target_pb2_grpc.TargetServiceStub(channel)
        await stub.Verify(target_pb2.VerifyRequest(), wait_for_ready=True, timeout=60)
        request = target_pb2.VerifyRequest(items=[target_pb2.VerifyItem(session_id="s" * 32, prefix_len=300, tokens=[5], draft_tokens=[1, 2, 3, 4])])
        opened = stub.VerifyStream() if stream else None
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            if opened is None:
                await stub.Verify(request)
            else:
                await opened.write(request)
                await opened.read()
            times.append(time.perf_counter() - started)
        if opened is not None:
            await opened.done_writing()
        return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_floor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--compute-ms", type=float, default=15.0)
    parser.add_argument("--serve", nargs=4, metavar=("PORT", "OURS", "COMPUTE_S", "WHERE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        port, ours, compute_s, where = args.serve
        asyncio.run(serve(int(port), ours == "1", float(compute_s), where))
        return 0
    for name, (ours, where, stream) in SETTINGS.items():
        port = free_port()
        compute_s = args.compute_ms / 1000 if where else 0.0
        server = subprocess.Popen([sys.executable, "-m", "bench.grpc_floor", "--serve", str(port), "1" if ours else "0", str(compute_s), where or "-"])
        try:
            times = sorted(asyncio.run(round_trips(port, args.calls, stream)))
        finally:
            server.terminate()
            server.wait(timeout=10)
        low, high = times[len(times) // 10], times[9 * len(times) // 10]
        extra = f" ({args.compute_ms:g} ms of compute)" if where else ""
        print(f"{name}{extra}: median {1000 * statistics.median(times):.2f} ms (p10 {1000 * low:.2f}, p90 {1000 * high:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
