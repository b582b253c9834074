"""Graceful shutdown: on SIGTERM a service reports NOT_SERVING at once, refuses new work with
UNAVAILABLE, lets the work in flight finish within --grace-s, then exits 0. A real SIGTERM to a
real `python -m draft_service` (n-gram drafting: no model to load), and the orchestrator's drain,
the function its SIGTERM handler runs, in process with a generation streaming through it; and
SIGTERM during start-up (a target loading its model, an orchestrator waiting for model services)
ends a real process with exit 0 at once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.inprocess import start_stack
from harness.probes import free_port
from harness.tiny import with_eos
from specdec.v1 import common_pb2, draft_pb2, draft_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc

pytestmark = pytest.mark.slow  # a real draft_service process and SIGTERM

ROOT = Path(__file__).resolve().parent.parent
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRACE_S = 3.0


def health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_for_health(channel: grpc.Channel, status: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if health(channel) == status:
                return
        except grpc.RpcError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"health did not become {status} within {timeout_s} s"
        time.sleep(0.1)


def start_draft_process(port: int, grace_s: float) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "draft_service", "--model", "ngram", "--port", str(port), "--grace-s", str(grace_s)]
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def draft_process():
    """A draft service process with a 3 s grace period, SERVING: (process, channel); killed if
    the test leaves it running."""
    port = free_port()
    process = start_draft_process(port, grace_s=GRACE_S)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        wait_for_health(channel, SERVING, timeout_s=120)
        yield process, channel
    finally:
        channel.close()
        if process.poll() is None:
            process.kill()
        process.wait(10)


def start_session(stub, session_id: str) -> None:
    stub.StartSession(common_pb2.StartSessionRequest(session_id=session_id, prompt_token_ids=[5, 6, 7, 5, 6]), timeout=10)


def propose(stub, session_id: str) -> draft_pb2.ProposeResponse:
    sampling = common_pb2.SamplingParams(top_p=1.0)  # greedy
    item = draft_pb2.ProposeItem(session_id=session_id, prefix_len=5, tokens=[7], num_speculative_tokens=2, sampling=sampling)
    return stub.Propose(draft_pb2.ProposeRequest(items=[item]), timeout=10)


def exit_code_within(process: subprocess.Popen, timeout_s: float) -> int:
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running {timeout_s} s after SIGTERM:\n{process.communicate()[0]}")


def test_sigterm_serves_open_sessions_refuses_new_ones_and_exits_0_after_the_grace_period(draft_process):
    """One process (starting one costs seconds of imports): an open session is still served after
    SIGTERM while new ones are refused; a session nobody ends holds the drain to the grace period,
    and then the process exits 0. (That a drain ends as soon as the work is done: the
    orchestrator's test below.)"""
    process, channel = draft_process
    stub = draft_pb2_grpc.DraftServiceStub(channel)
    start_session(stub, "in-flight")
    start_session(stub, "never-ended")
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_for_health(channel, NOT_SERVING, timeout_s=GRACE_S)
    with pytest.raises(grpc.RpcError) as refused:
        start_session(stub, "new")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert propose(stub, "in-flight").proposals[0].draft_tokens  # the open session still drafts
    stub.EndSession(common_pb2.EndSessionRequest(session_id="in-flight"), timeout=10)
    assert exit_code_within(process, 30) == 0
    assert GRACE_S - 0.5 < time.monotonic() - signalled < GRACE_S + 10  # plus the interpreter's exit


def test_orchestrator_drain_finishes_the_running_stream_and_refuses_new_ones(tiny_target):
    """RunningOrchestrator.stop(grace_s), which `python -m orchestrator` runs on SIGTERM, while a
    200-token stream (about 2 s here) is running."""
    stack = start_stack(with_eos(tiny_target, ()))
    request = orchestrator_pb2.GenerateRequest(prompt="Once upon a time", max_new_tokens=200, num_speculative_tokens=0)
    try:
        with stack.channel("orchestrator") as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            stream = stub.GenerateStream(request, timeout=60)
            received = list(next(stream).token_ids)
            stopped = asyncio.run_coroutine_threadsafe(stack.orchestrator.stop(grace_s=60), stack.loop.loop)
            wait_for_health(channel, NOT_SERVING, timeout_s=5)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            for delta in stream:
                received += delta.token_ids
            assert len(received) == 200 and delta.finish_reason == orchestrator_pb2.FINISH_REASON_LENGTH
            stopped.result(30)  # the server stops once the stream is done, long before the grace period ends
    finally:
        stack.stop()


# A target whose model never finishes loading: its loader sleeps (what SIGTERM must interrupt).
LOADING_FOREVER = """
import asyncio, sys, time
import target_service.server as server
from specdec.config import parse
from specdec.model_service.runtime import run_model_service
server.load_causal_lm = lambda *args: time.sleep(600)
asyncio.run(run_model_service(parse(server.TargetConfig, "target_service", "SPECDEC_TARGET", "", sys.argv[1:]), server.start))
"""


@pytest.mark.parametrize("service", ["target_service", "orchestrator"])
def test_sigterm_during_start_up_exits_0_at_once(service):
    """A target still loading its model, an orchestrator still waiting for model services that
    never come: SIGTERM ends either with exit 0 within seconds. (In a container the service is
    process 1, which a signal without a handler never reaches: the runtime's SIGKILL ended both,
    with 137, when the Compose stack first ran.)"""
    port = free_port()
    if service == "target_service":
        command = [sys.executable, "-c", LOADING_FOREVER, "--model", "unused", "--port", str(port)]
    else:
        nobody = f"127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "orchestrator", "--port", str(port), "--target", nobody, "--draft", nobody]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_for_health(channel, NOT_SERVING, timeout_s=120)  # listening, not ready
        time.sleep(1)  # well into loading or waiting
        process.send_signal(signal.SIGTERM)
        assert exit_code_within(process, 10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
