"""Prometheus metrics scraped over HTTP from the real services (tiny models, in-process): the
spec-decode counters move by exactly a request's stats and agree with each other, latencies and
finish reasons are recorded, errors are counted by status code, and the sessions gauge follows the
model services' sessions.

Counters live in the process's registry, which other test modules also move: every check compares
a scrape before with one after."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from draft_service.drafters.model import ModelDrafter
from harness.inprocess import start_stack
from harness.probes import free_port
from harness.tiny import with_eos
from specdec.v1 import common_pb2, orchestrator_pb2, target_pb2_grpc
from target_service import server as target_server

ORCHESTRATOR = {"service": "orchestrator"}
DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "specdec-dashboard.json"


def exposition(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value of every sample the endpoint serves."""
    text = exposition(port)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset({**ORCHESTRATOR, **labels}.items())), 0.0)


@pytest.fixture(scope="module")
def stack(tiny_target):
    """The draft is the target's own model: acceptance is high but, at K = 4 with max_new_tokens
    not a multiple of K + 1, the last round drafts fewer tokens."""
    target = with_eos(tiny_target, ())
    running = start_stack(target, ModelDrafter(target), metrics_port=free_port())
    yield running
    running.stop()


def request(**fields) -> orchestrator_pb2.GenerateRequest:
    fields = {"max_new_tokens": 13, "num_speculative_tokens": 4, **fields}
    return orchestrator_pb2.GenerateRequest(prompt="Once upon a time", **fields)


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_a_request_moves_the_counters_by_its_stats(stack, orchestrator, rpc):
    port = stack.orchestrator.metrics.port
    before = scrape(port)
    if rpc == "Generate":
        last = orchestrator.Generate(request(), timeout=60)
    else:
        last = list(orchestrator.GenerateStream(request(), timeout=60))[-1]
    after = scrape(port)
    stats = last.stats

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    draft_tokens = moved("specdec:spec_decode_num_draft_tokens_total")
    accepted = moved("specdec:spec_decode_num_accepted_tokens_total")
    forwards = moved("specdec:spec_decode_num_target_forward_passes_total")
    assert (draft_tokens, accepted, forwards) == (stats.draft_tokens, stats.accepted_tokens, stats.target_forward_passes)
    assert 0 < accepted <= draft_tokens
    per_position = [moved("specdec:spec_decode_num_accepted_tokens_per_pos_total", position=str(p)) for p in range(4)]
    assert per_position == list(stats.accepted_per_position)
    assert sum(per_position) == accepted and per_position == sorted(per_position, reverse=True)  # position i needs i - 1 accepted
    drafts = moved("specdec:spec_decode_num_drafts_total")
    assert 0 < drafts <= forwards and draft_tokens <= 4 * drafts
    # every round commits its accepted drafts plus one token; tokens per target forward as reported
    emitted = moved("specdec:spec_decode_num_emitted_tokens_total")
    assert emitted == accepted + forwards
    assert emitted / forwards == pytest.approx(stats.tokens_per_target_forward, rel=1e-6)
    assert moved("specdec:generation_tokens_total") == stats.generated_tokens == 13
    assert moved("specdec:request_success_total", finished_reason="length") == 1
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert moved(f"specdec:{histogram}_count") == 1
    assert moved("specdec:e2e_request_latency_seconds_sum") == pytest.approx(stats.total_seconds)
    assert moved("specdec:time_to_first_token_seconds_sum") == pytest.approx(stats.time_to_first_token_seconds)
    assert 0 < moved("specdec:time_per_output_token_seconds_sum") < stats.total_seconds
    assert value(after, "specdec:num_sessions_running") == 0


def test_errors_are_counted_by_status_code(stack, orchestrator):
    port = stack.orchestrator.metrics.port
    before = scrape(port)
    with pytest.raises(grpc.RpcError) as raised:
        orchestrator.Generate(request(max_new_tokens=0), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as raised:
        list(orchestrator.GenerateStream(request(max_new_tokens=400), timeout=0.05))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def errors() -> dict[str, float]:
        after = scrape(port)
        name = "specdec:request_errors_total"
        return {
            code: value(after, name, code=code) - value(before, name, code=code)
            for code in ("INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "CANCELLED")
        }

    # The client gives up at its deadline; the server ends the call a moment later, either by
    # noticing the deadline itself (DEADLINE_EXCEEDED) or by gRPC cancelling the handler.
    deadline = time.monotonic() + 10
    while (counted := errors())["DEADLINE_EXCEEDED"] + counted["CANCELLED"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted["INVALID_ARGUMENT"] == 1 and counted["DEADLINE_EXCEEDED"] + counted["CANCELLED"] == 1


def test_a_model_service_serves_its_sessions_and_the_batch_metrics(stack, tiny_target):
    """A target started with --metrics-port: its own endpoint counts its sessions."""
    target = stack.loop.run(target_server.start(target_server.TargetConfig(port=0, metrics_port=free_port()), loaded=tiny_target))
    try:
        port = target.metrics.port

        def running() -> float:
            return scrape(port).get(("specdec:num_sessions_running", frozenset({"service": "target"}.items())), 0.0)

        held = running()
        with grpc.insecure_channel(f"127.0.0.1:{target.port}") as channel:
            stub = target_pb2_grpc.TargetServiceStub(channel)
            stub.StartSession(common_pb2.StartSessionRequest(session_id="metrics-test", prompt_token_ids=[1, 2, 3]), timeout=30)
            assert running() == held + 1
            stub.EndSession(common_pb2.EndSessionRequest(session_id="metrics-test"), timeout=30)
        assert running() == held
        # the scheduler's metrics are declared for every service, whether or not it recorded yet
        text = exposition(port)
        for name in ("specdec:batch_size", "specdec:num_requests_waiting", "specdec:request_queue_time_seconds"):
            assert f"# TYPE {name} " in text
    finally:
        stack.loop.run(target.stop())
    with pytest.raises(OSError):
        scrape(port)  # the endpoint stops with the service


def test_the_dashboard_queries_only_served_series(stack):
    """Every series the Grafana dashboard's PromQL names is one the services declare."""
    served = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\w+)$", exposition(stack.orchestrator.metrics.port), flags=re.M):
        served |= {name} | ({f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else set())
    panels = json.loads(DASHBOARD.read_text())["panels"]
    used = {name for panel in panels for target in panel["targets"] for name in re.findall(r"specdec:\w+", target["expr"])}
    assert used and used <= served, used - served
    titles = {panel["title"] for panel in panels}
    assert {"Acceptance rate", "Tokens per target forward", "Time to first token", "Time per output token"} <= titles
