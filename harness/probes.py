"""Looking at running services from outside: a free port to give one, waiting until one reports
SERVING, and how many sessions the model services hold (what leak checks compare)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.v1 import common_pb2, draft_pb2_grpc, target_pb2_grpc


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_serving(address: str, process: subprocess.Popen | None, timeout_s: float, log: Path | None = None) -> None:
    """Poll the service at `address` until it reports SERVING; fail early if `process` exits."""
    deadline = time.monotonic() + timeout_s
    # While the process starts, connections are refused; gRPC's reconnect backoff would grow
    # to many seconds between attempts (1, 1.6, 2.6, 4.1 s, ...) and notice SERVING late.
    quick_reconnect = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 300)]
    with grpc.insecure_channel(address, options=quick_reconnect) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the service at {address} exited with {process.returncode}; see {log or 'its log'}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"the service at {address} did not report SERVING within {timeout_s} s")


def sessions_held(stack) -> tuple[int, int]:
    """active_sessions of the target and the draft of `stack` (anything with `address(which)`)."""
    request = common_pb2.GetModelInfoRequest()
    with grpc.insecure_channel(stack.address("target")) as t, grpc.insecure_channel(stack.address("draft")) as d:
        target = target_pb2_grpc.TargetServiceStub(t).GetModelInfo(request, timeout=10)
        draft = draft_pb2_grpc.DraftServiceStub(d).GetModelInfo(request, timeout=10)
    return target.active_sessions, draft.active_sessions


def wait_for_sessions(stack, count: int = 0, timeout_s: float = 10.0) -> tuple[int, int]:
    """Sessions held once both services are back to `count` each (or when the timeout passed)."""
    deadline = time.monotonic() + timeout_s
    while (held := sessions_held(stack)) != (count, count) and time.monotonic() < deadline:
        time.sleep(0.05)
    return held
