"""Replicas with real processes: two targets and two drafts behind one orchestrator. The target
replica serving a stream is killed (kill -9) or stopped (SIGTERM) mid-way: the stream goes on,
identical to an undisturbed run, on the other replica; a killed draft replica is replaced by the
other; with both targets gone, requests end with UNAVAILABLE, and once one is back they succeed."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from harness.processes import ServiceStack
from specdec_client.connection import RequestError
from specdec.v1 import common_pb2, draft_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc, target_pb2_grpc
from tests.test_faults import LONG, ORCHESTRATOR_ARGS, eventually, health, request, SERVING, target_dir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow  # real service processes
RECONNECT_S = 3.0  # a health period (0.5 s) and the longest reconnect backoff (orchestrator/health.py: 2 s)


@pytest.fixture(scope="module")
def services(target_dir, tmp_path_factory):  # noqa: F811
    model_service_args = ("--grace-s", "0")
    with ServiceStack(
        target_model=str(target_dir), draft_model="ngram", log_dir=tmp_path_factory.mktemp("logs"), startup_timeout_s=120,
        extra_target_args=model_service_args, extra_draft_args=model_service_args, extra_orchestrator_args=ORCHESTRATOR_ARGS, replicas=2,
    ) as stack:
        yield stack


@pytest.fixture
def stack(services):
    restarted = [name for name, process in services.processes.items() if process.poll() is not None]
    for name in restarted:
        services.restart(name)
    if restarted:  # the orchestrator sees them back at its next health round, and its channel after a reconnect backoff (<= 2 s)
        time.sleep(RECONNECT_S)
    eventually(lambda: health(services) == SERVING, 15, "orchestrator SERVING")
    return services


@pytest.fixture
def orchestrator(stack):
    with grpc.insecure_channel(stack.address("orchestrator")) as channel:
        yield orchestrator_pb2_grpc.OrchestratorStub(channel)


@pytest.fixture(scope="module")
def reference(services) -> list[int]:
    with grpc.insecure_channel(services.address("orchestrator")) as channel:
        reply = orchestrator_pb2_grpc.OrchestratorStub(channel).Generate(request(LONG), timeout=60)
    return list(reply.token_ids)


def holder(stack, names: list[str]) -> str | None:
    """The replica among `names` holding a session (the stream's), if any."""
    for name in names:
        stub = target_pb2_grpc.TargetServiceStub if name.startswith("target") else draft_pb2_grpc.DraftServiceStub
        with grpc.insecure_channel(stack.address(name)) as channel:
            if stub(channel).GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=5).active_sessions:
                return name
    return None


def stop_holder_mid_stream(stack, orchestrator, names: list[str], how: signal.Signals):
    """Stream the long request; once 20 tokens arrived, send `how` to the replica holding its
    session. Tokens received and the final message (or the error)."""
    tokens, last, victim = [], None, None
    try:
        for message in orchestrator.GenerateStream(request(LONG), timeout=120):
            tokens += message.token_ids
            last = message
            if len(tokens) >= 20 and victim is None:
                victim = holder(stack, names)
                stack.processes[victim].send_signal(how)
                stack.processes[victim].wait(20)
    except grpc.RpcError as error:
        return tokens, error, victim
    return tokens, last, victim


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_the_target_replica_of_a_stream_dies_and_the_stream_goes_on_identically(stack, orchestrator, reference, how):
    tokens, final, victim = stop_holder_mid_stream(stack, orchestrator, stack.targets, how)
    assert victim is not None and isinstance(final, orchestrator_pb2.GenerateResponse), f"the stream failed: {final}"
    assert tokens == reference and final.stats.target_rebuilds == 1
    survivor = next(name for name in stack.targets if name != victim)
    eventually(lambda: holder(stack, [survivor]) is None, 10, "no session left on the surviving replica")


def test_a_draft_replica_killed_mid_stream_is_replaced(stack, orchestrator, reference):
    tokens, final, victim = stop_holder_mid_stream(stack, orchestrator, stack.drafts, signal.SIGKILL)
    assert victim is not None and isinstance(final, orchestrator_pb2.GenerateResponse), f"the stream failed: {final}"
    assert tokens == reference and final.stats.draft_rebuilds == 1


def test_with_every_target_gone_requests_fail_cleanly_and_succeed_once_one_is_back(stack, orchestrator, reference):
    streamed, error = "", None
    try:
        for message in orchestrator.GenerateStream(request(LONG), timeout=120):
            streamed += message.text
            if len(streamed) > 40 and stack.processes[stack.targets[0]].poll() is None:
                for name in stack.targets:
                    stack.processes[name].kill()
                    stack.processes[name].wait(10)
    except grpc.RpcError as raised:
        error = RequestError.from_rpc_error(raised)
    assert error is not None and error.code == grpc.StatusCode.UNAVAILABLE, "the stream outlived every target"
    assert error.generated_text.startswith(streamed) and len(error.generated_text) > 40  # the output so far, in the details
    eventually(lambda: health(stack) != SERVING, 10, "orchestrator NOT_SERVING without targets")
    with pytest.raises(grpc.RpcError) as refused:
        orchestrator.Generate(request(), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    stack.restart(stack.targets[1])
    eventually(lambda: health(stack) == SERVING, 15, "orchestrator SERVING once a target is back")
    reply = orchestrator.Generate(request(), timeout=30)
    assert list(reply.token_ids) == reference[:40]
