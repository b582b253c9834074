"""Speculative decoding over a slow network: latency injected between the orchestrator and the
model services by bench/netem.py's delay proxy, at 0, 2 and 10 ms round-trip time.

The output must stay exactly the target's greedy output whatever the latency, and with a draft
that the target accepts, speculation must pay off more as the round trip grows: it needs one
Propose + Verify per K+1 tokens where target-only decoding needs one Verify per token.
"""

from __future__ import annotations

import time

import grpc
import pytest

from harness.netem import DelayProxy
from orchestrator import server as orchestrator_server
from specdec.v1 import orchestrator_pb2, orchestrator_pb2_grpc

PROMPT = "The quick brown fox jumps over the lazy dog. Then"
NEW_TOKENS = 24
RTTS_MS = (0, 2, 10)


def generate(stub, k: int) -> orchestrator_pb2.GenerateResponse:
    request = orchestrator_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=NEW_TOKENS, num_speculative_tokens=k)
    return stub.Generate(request, timeout=120)


@pytest.fixture(scope="module")
def delayed(stack, tiny_target):
    """A second orchestrator that reaches the target and draft through delay proxies; yields its
    stub and the proxies (set their one_way_s to change the latency)."""

    async def start():
        proxies = [await DelayProxy(stack.address(which)).start() for which in ("target", "draft")]
        config = orchestrator_server.OrchestratorConfig(
            port=0, target=proxies[0].address, draft=proxies[1].address, connect_timeout_s=60
        )
        return proxies, await orchestrator_server.start(config, tokenizer=tiny_target.tokenizer)

    proxies, orchestrator = stack.loop.run(start())
    with grpc.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        yield orchestrator_pb2_grpc.OrchestratorStub(channel), proxies

    async def stop():
        await orchestrator.stop()
        for proxy in proxies:
            await proxy.stop()

    stack.loop.run(stop())


@pytest.fixture(scope="module")
def reference(stack) -> list[int]:
    """Greedy target-only output with no proxy in the way."""
    with stack.channel("orchestrator") as channel:
        return list(generate(orchestrator_pb2_grpc.OrchestratorStub(channel), k=0).token_ids)


@pytest.mark.parametrize("rtt_ms", RTTS_MS)
def test_output_is_exact_and_speculation_saves_round_trips(delayed, reference, rtt_ms):
    stub, proxies = delayed
    for proxy in proxies:
        proxy.one_way_s = rtt_ms / 2000
    timings = {}
    for k in (0, 4):
        started = time.perf_counter()
        reply = generate(stub, k)
        timings[k] = time.perf_counter() - started
        assert list(reply.token_ids) == reference, f"K={k} at {rtt_ms} ms RTT"
        # every round is at least one round trip (two with a draft): the delay is really there
        assert reply.stats.total_seconds >= reply.stats.rounds * rtt_ms / 1000
    speedup = timings[0] / timings[4]
    print(f"{rtt_ms} ms RTT: target-only {timings[0] * 1000:.0f} ms, K=4 {timings[4] * 1000:.0f} ms, speedup {speedup:.2f}x")
    if rtt_ms >= 10:  # 24 round trips against 2 x 5: the network decides, not the (tiny) models
        assert speedup > 1.2
