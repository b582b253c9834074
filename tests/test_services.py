"""The three services as real gRPC servers on loopback ports: the public API, greedy equality and
bytes per round across the network, health and reflection, a clear status naming the field for
every bad input, and no session left behind by cancelled or timed-out requests."""

from __future__ import annotations

import math
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from draft_service.drafters.model import ModelDrafter
from harness.inprocess import start_stack
from harness.probes import sessions_held, wait_for_sessions
from harness.tiny import tiny_lm, with_eos
from specdec.errors import FailedPrecondition
from specdec.v1 import common_pb2, draft_pb2, draft_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc, target_pb2, target_pb2_grpc
from tests.helpers import bad_request_fields

PROMPT = "Once upon a time, in a land far away,"


def request(**fields) -> orchestrator_pb2.GenerateRequest:
    fields.setdefault("max_new_tokens", 20)
    if "messages" not in fields:
        fields.setdefault("prompt", PROMPT)
    return orchestrator_pb2.GenerateRequest(**fields)


def test_every_service_reports_serving_and_serves_reflection(stack):
    names = {
        "target": "specdec.v1.TargetService",
        "draft": "specdec.v1.DraftService",
        "orchestrator": "specdec.v1.Orchestrator",
    }
    for which, name in names.items():
        with stack.channel(which) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", name):
                assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            assert name in {s.name for s in answer.list_services_response.service}


def test_generate_equals_the_concatenated_stream(orchestrator):
    whole = orchestrator.Generate(request(), timeout=60)
    parts = list(orchestrator.GenerateStream(request(), timeout=60))
    assert "".join(p.text for p in parts) == whole.text
    assert [t for p in parts for t in p.token_ids] == list(whole.token_ids)
    assert parts[-1].finish_reason == whole.finish_reason == orchestrator_pb2.FINISH_REASON_LENGTH
    assert all(not p.HasField("stats") for p in parts[:-1]) and parts[-1].HasField("stats")
    assert whole.stats.generated_tokens == len(whole.token_ids) == 20


@pytest.mark.parametrize("k", [1, 3, 7])
def test_greedy_speculative_equals_target_only_across_the_network(orchestrator, k):
    baseline = orchestrator.Generate(request(num_speculative_tokens=0), timeout=60)
    speculative = orchestrator.Generate(request(num_speculative_tokens=k), timeout=60)
    assert list(speculative.token_ids) == list(baseline.token_ids)
    stats = speculative.stats
    assert stats.acceptance_rate == 1.0 and stats.num_speculative_tokens == k
    assert stats.tokens_per_target_forward > 1
    assert stats.target_forward_passes == stats.rounds < baseline.stats.target_forward_passes == 20
    assert stats.draft_forward_passes > 0 and stats.network_seconds > 0 and stats.target_seconds > 0
    # the timeline: the network time splits into transport and the services' own overheads
    parts = [stats.draft_transport_seconds, stats.target_transport_seconds, stats.draft_service_overhead_seconds,
             stats.target_service_overhead_seconds]
    assert stats.network_seconds == pytest.approx(sum(parts), rel=1e-5) and min(parts) >= 0
    assert stats.target_transport_seconds > 0 and stats.orchestrator_seconds > 0 and stats.target_conversion_seconds > 0
    # Greedy sends token ids only: a few dozen bytes per call.
    assert stats.bytes_per_round < 340  # token ids, a few counters and the timings of both calls: no probabilities


def test_chat_messages_and_sampling_with_seed(orchestrator):
    chat = request(messages=[orchestrator_pb2.ChatMessage(role="user", content="Tell me a story.")], temperature=0.8, top_p=0.95, seed=7)
    first, second = orchestrator.Generate(chat, timeout=60), orchestrator.Generate(chat, timeout=60)
    assert list(first.token_ids) == list(second.token_ids)
    # Sampling adds the draft's sparse distributions (64 ids + probabilities per draft token).
    assert first.stats.bytes_per_round > 64 * 8


BAD_REQUESTS = {
    "empty prompt": (dict(prompt=""), "prompt"),
    "prompt and messages": (dict(messages=[orchestrator_pb2.ChatMessage(role="user", content="hi")], prompt="x"), "prompt"),
    "unknown role": (dict(messages=[orchestrator_pb2.ChatMessage(role="wizard", content="hi")]), "messages[0].role"),
    "prompt over the context": (dict(prompt=" a" * 600), "prompt"),
    "prompt + max_new_tokens over the context": (dict(prompt=" a" * 500, max_new_tokens=100), "max_new_tokens"),
    "max_new_tokens 0": (dict(max_new_tokens=0), "max_new_tokens"),
    "max_new_tokens negative": (dict(max_new_tokens=-5), "max_new_tokens"),
    "max_new_tokens over the limit": (dict(max_new_tokens=1_000_000), "max_new_tokens"),
    "temperature negative": (dict(temperature=-0.1), "temperature"),
    "temperature NaN": (dict(temperature=math.nan), "temperature"),
    "top_p 0": (dict(top_p=0.0), "top_p"),
    "top_p over 1": (dict(top_p=1.5), "top_p"),
    "top_k negative": (dict(top_k=-1), "top_k"),
    "K over the limit": (dict(num_speculative_tokens=17), "num_speculative_tokens"),
    "K negative": (dict(num_speculative_tokens=-1), "num_speculative_tokens"),
    "empty stop string": (dict(stop=[""]), "stop"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_naming_the_field(stack, orchestrator, case):
    fields, field = BAD_REQUESTS[case]
    for call in (orchestrator.Generate, lambda r, timeout: list(orchestrator.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as error:
            call(request(**fields), timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(error.value)[0] == field
    assert sessions_held(stack) == (0, 0)


def test_unknown_session_on_the_model_services(stack):
    with stack.channel("target") as t, stack.channel("draft") as d:
        target, draft = target_pb2_grpc.TargetServiceStub(t), draft_pb2_grpc.DraftServiceStub(d)
        item = target_pb2.VerifyItem(session_id="nobody", prefix_len=0, tokens=[1], sampling=common_pb2.SamplingParams(top_p=1))
        with pytest.raises(grpc.RpcError) as error:
            target.Verify(target_pb2.VerifyRequest(items=[item]), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND and bad_request_fields(error.value)[0] == "items[0].session_id"
        propose = draft_pb2.ProposeItem(session_id="nobody", tokens=[1], num_speculative_tokens=2, sampling=common_pb2.SamplingParams(top_p=1))
        with pytest.raises(grpc.RpcError) as error:
            draft.Propose(draft_pb2.ProposeRequest(items=[propose]), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND and bad_request_fields(error.value)[0] == "items[0].session_id"
        assert not target.EndSession(common_pb2.EndSessionRequest(session_id="nobody"), timeout=10).existed


def test_nan_draft_probabilities_are_rejected_by_the_target(stack):
    with stack.channel("target") as channel:
        target = target_pb2_grpc.TargetServiceStub(channel)
        target.StartSession(common_pb2.StartSessionRequest(session_id="nan-test", prompt_token_ids=[1, 2, 3]), timeout=10)
        try:
            probs = common_pb2.SparseDistribution(token_ids=(5).to_bytes(4, "little"), probs=b"\x00\x00\xc0\x7f")  # float32 NaN
            item = target_pb2.VerifyItem(
                session_id="nan-test", prefix_len=2, tokens=[3], draft_tokens=[5], draft_probs=[probs],
                sampling=common_pb2.SamplingParams(temperature=1.0, top_p=1.0), uniforms=[0.5, 0.5],
            )
            with pytest.raises(grpc.RpcError) as error:
                target.Verify(target_pb2.VerifyRequest(items=[item]), timeout=10)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert bad_request_fields(error.value)[0] == "items[0].draft_probs[0].probs"
        finally:
            target.EndSession(common_pb2.EndSessionRequest(session_id="nan-test"), timeout=10)


def test_cancelled_streams_leave_no_session_on_either_model_service(stack, orchestrator):
    for _ in range(5):
        stream = orchestrator.GenerateStream(request(max_new_tokens=400, num_speculative_tokens=2), timeout=60)
        next(stream)
        stream.cancel()
    assert wait_for_sessions(stack) == (0, 0)


def test_deadline_exceeded_is_reported_and_frees_the_sessions(stack, orchestrator):
    with pytest.raises(grpc.RpcError) as error:
        orchestrator.Generate(request(max_new_tokens=450, num_speculative_tokens=0), timeout=0.3)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for_sessions(stack) == (0, 0)


def test_orchestrator_refuses_a_draft_with_another_vocabulary(tiny_target):
    other = ModelDrafter(tiny_lm(seed=3, vocab_size=64, max_context=512))
    other.vocab_fingerprint = "a-different-tokenizer"
    with pytest.raises(FailedPrecondition) as error:
        start_stack(tiny_target, other)
    assert error.value.field == "draft"


class BrokenDrafter(ModelDrafter):
    """Proposes once, then fails every call: the draft service answers INTERNAL."""

    calls = 0

    def propose(self, sessions, work):
        BrokenDrafter.calls += 1
        if BrokenDrafter.calls > 1:
            raise RuntimeError("drafter crashed")
        return super().propose(sessions, work)


def test_a_failing_draft_falls_back_to_exact_target_only_decoding(tiny_target, tiny_draft):
    target = with_eos(tiny_target, ())
    running = start_stack(target, BrokenDrafter(tiny_draft))
    try:
        with running.channel("orchestrator") as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            BrokenDrafter.calls = 0  # forget the service's warm-up call
            speculative = stub.Generate(request(num_speculative_tokens=3), timeout=60)
            baseline = stub.Generate(request(num_speculative_tokens=0), timeout=60)
        assert list(speculative.token_ids) == list(baseline.token_ids)
        assert speculative.stats.draft_tokens == 3  # one round drafted, then the draft was dropped
    finally:
        running.stop()


def test_health_is_not_serving_until_the_model_is_loaded():
    import asyncio
    import threading

    from harness.loop import LoopThread
    from harness.probes import free_port
    from specdec.messages import ModelInfo
    from specdec.model_service.runtime import ModelWorker, SessionServicerBase, start_model_service
    from specdec.v1 import target_pb2_grpc as grpc_module
    from target_service.server import SERVICE_NAME, TargetConfig

    loaded = threading.Event()

    class Engine:
        sessions = {}  # none held: stop() drains at once

        @staticmethod
        def info():
            return ModelInfo("fake", 0, "", 16, (), 4)

    def load_engine():
        loaded.wait(30)
        return Engine()

    class Servicer(SessionServicerBase, grpc_module.TargetServiceServicer):
        pass

    port = free_port()
    loop = LoopThread()
    future = asyncio.run_coroutine_threadsafe(
        start_model_service(TargetConfig(port=port), Servicer(ModelWorker("test")), grpc_module.add_TargetServiceServicer_to_server, SERVICE_NAME, load_engine),
        loop.loop,
    )
    try:
        time.sleep(0.5)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as error:
                target_pb2_grpc.TargetServiceStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=5)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            loaded.set()
            running = future.result(30)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        loop.run(running.stop())
    finally:
        loaded.set()
        loop.close()


def test_bearer_token_authentication(tiny_target, tmp_path):
    """With --auth-token-file, Generate and GenerateStream need one of the file's tokens; health
    checks and reflection stay open for probes and tools."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# application tokens\nfirst-secret\n\nsecond-secret\n")
    secured = start_stack(with_eos(tiny_target, ()), auth_token_file=str(tokens))
    try:
        with secured.channel("orchestrator") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "first-secret"),)):
                with pytest.raises(grpc.RpcError) as unary:
                    stub.Generate(request(), metadata=metadata, timeout=30)
                assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as streamed:
                    list(stub.GenerateStream(request(), metadata=metadata, timeout=30))
                assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED
            for token in ("first-secret", "second-secret"):
                reply = stub.Generate(request(), metadata=(("authorization", f"Bearer {token}"),), timeout=30)
                assert reply.stats.generated_tokens > 0
            streamed = list(stub.GenerateStream(request(), metadata=(("authorization", "bearer second-secret"),), timeout=30))
            assert streamed[-1].stats.generated_tokens > 0
    finally:
        secured.stop()
