"""Adaptive K: the policy's arithmetic and choices, and proof that letting it choose K per round
never changes the output (greedy: identical tokens; sampling: the target's distribution)."""

from __future__ import annotations

import asyncio

import pytest

from draft_service.drafters.model import ModelDrafter
from harness.inprocess import in_process_engine, run_generation, start_stack
from harness.tiny import tiny_lm, with_eos
from orchestrator.generation import GenerationRequest
from orchestrator.policy import MAX_PROBE_EVERY, PROBE_EVERY, AdaptiveK, CostCurve, KSettings, LoadEstimates, expected_tokens
from specdec import sampling
from tests.helpers import joined
from tests.test_speculation import assert_target_marginals, sample_many

# Forward seconds by tokens scored: a CPU-like curve (cost grows with tokens) and a GPU-like one
# (flat until large batches).
CPU_CURVE = CostCurve(((1, 0.080), (5, 0.200), (10, 0.300), (40, 1.000), (80, 2.000)))
GPU_CURVE = CostCurve(((1, 0.010), (5, 0.0105), (40, 0.012), (80, 0.015)))


def test_expected_tokens_per_round():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_cost_curve_interpolates_and_extends():
    assert CPU_CURVE(1) == pytest.approx(0.080)
    assert CPU_CURVE(3) == pytest.approx(0.140)
    assert CPU_CURVE(160) == pytest.approx(4.000)  # past the last point along the last slope
    assert not CostCurve(())


def policy(curve, batch=1.0, acceptance=0.8, max_speculative_tokens=8):
    """A policy whose orchestrator-wide acceptance is `acceptance` (from plenty of evidence)."""
    load = LoadEstimates(curve, batch_size=batch, accepted=1000 * acceptance, rejected=1000 * (1 - acceptance))
    return AdaptiveK(load, max_speculative_tokens)


def test_k_grows_with_acceptance_where_verification_is_flat():
    ks = [policy(GPU_CURVE, acceptance=a).next_k() for a in (0.3, 0.6, 0.9)]
    assert ks == sorted(ks) and ks[-1] >= 6 and ks[0] >= 1


def test_k_falls_to_zero_as_batches_grow_on_a_cpu_curve():
    ks = [policy(CPU_CURVE, batch=b, acceptance=0.7).next_k() for b in (1, 4, 16)]
    assert ks[0] >= 2 and ks == sorted(ks, reverse=True) and ks[-1] == 0


def test_k_is_zero_for_a_weak_draft_but_probes_ever_less_often():
    weak = policy(CPU_CURVE, acceptance=0.1)
    ks = [weak.next_k() for _ in range(PROBE_EVERY * (1 + 2 + 4 + 8 + 8))]
    probes = [round_ + 1 for round_, k in enumerate(ks) if k]
    assert set(ks) == {0, 1}
    assert probes == [PROBE_EVERY * n for n in (1, 3, 7, 15, 23)]  # intervals doubling up to the largest
    assert probes[-1] - probes[-2] == MAX_PROBE_EVERY


def test_no_probe_while_the_load_alone_rules_speculation_out():
    """At a batch size where even drafts that are always accepted would not pay on this curve, a
    probe would only cost a draft session's prefill: none is sent. The same policy probes again
    once batches shrink."""
    loaded = policy(CPU_CURVE, batch=16, acceptance=0.1)
    assert loaded.throughput(1, 1.0) < 1.1 * loaded.throughput(0)
    assert {loaded.next_k() for _ in range(PROBE_EVERY * 20)} == {0}
    loaded.load.batch_size = 1.0
    assert 1 in {loaded.next_k() for _ in range(MAX_PROBE_EVERY)}


def test_a_request_learns_its_own_acceptance():
    request = policy(CPU_CURVE, acceptance=0.3, max_speculative_tokens=4)
    before = request.next_k()
    for _ in range(20):
        request.observe(4, 4)  # everything accepted: a predictable continuation
    assert request.acceptance > 0.8 and request.next_k() > before


def test_observed_forward_times_rescale_the_curve():
    load = LoadEstimates(CPU_CURVE)
    for _ in range(50):
        load.observe_verify(compute_s=2 * CPU_CURVE(10), batch_size=2, batch_tokens=10)
    assert load.curve_scale == pytest.approx(2.0, rel=0.01) and load.batch_size == pytest.approx(2.0, rel=0.01)


def test_greedy_output_with_adaptive_k_equals_target_only(tiny_target):
    """Adaptive K (a draft identical to the target on a flat curve drafts long, a random one on a
    steep curve drafts little) never changes greedy output."""
    target = with_eos(tiny_target, ())
    baseline = joined(run_generation(in_process_engine(target), GenerationRequest(prompt="Adaptive", max_new_tokens=30, num_speculative_tokens=0)))
    for curve in (GPU_CURVE, CPU_CURVE):
        generator = in_process_engine(target, ModelDrafter(target), k_settings=KSettings(num_speculative_tokens=6))
        generator.load = LoadEstimates(curve)
        events = run_generation(generator, GenerationRequest(prompt="Adaptive", max_new_tokens=30))
        assert joined(events) == baseline
        assert events[-1].stats.adaptive_k and events[-1].stats.draft_tokens > 0


def test_sampled_distribution_stays_exact_while_k_changes_every_few_rounds():
    """The chi-square test of test_speculation with adaptive K: K varies from round to round with
    the acceptance just observed, and the output is still the target's distribution."""
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.1)
    draft = tiny_lm(seed=22, vocab_size=16, eos=(), init=0.1)
    prompt, steps, params = [3, 1, 4, 1, 5], 3, sampling.SamplingParams(1.0)
    curve = CostCurve(((1, 1.0), (2, 1.15), (3, 1.3), (4, 1.45)))  # K follows the acceptance estimate
    load = LoadEstimates(curve)
    chosen: list[int] = []

    class Recorded(AdaptiveK):
        def next_k(self) -> int:
            chosen.append(super().next_k())
            return chosen[-1]

    counts, stats = asyncio.run(
        sample_many(target, ModelDrafter(draft), prompt, params, 0, steps, trials=2000, make_policy=lambda: Recorded(load, 3))
    )
    assert len(set(chosen)) >= 2, set(chosen)
    assert stats.accepted_tokens > 50 and stats.draft_tokens - stats.accepted_tokens > 50
    assert_target_marginals(counts, target, prompt, params)


def test_a_request_starting_at_k_zero_starts_the_draft_session_at_its_first_probe(tiny_target, tiny_draft):
    """Where speculation does not pay, the draft's session is not even started (no prefill on the
    draft) until a probe drafts; the probe's session holds the sequence so far, output stays exact."""
    target = with_eos(tiny_target, ())
    baseline = joined(run_generation(in_process_engine(target), GenerationRequest(prompt="Lazy", max_new_tokens=60, num_speculative_tokens=0)))
    generator = in_process_engine(target, ModelDrafter(tiny_draft))
    generator.load = LoadEstimates(CPU_CURVE, accepted=1.0, rejected=99.0)
    draft_engine = generator.draft.engine
    started = []
    original_start = draft_engine.start_session
    draft_engine.start_session = lambda session_id, prompt, *more: started.append(len(prompt)) or original_start(session_id, prompt, *more)
    events = run_generation(generator, GenerationRequest(prompt="Lazy", max_new_tokens=60))
    assert joined(events) == baseline
    prompt_length = len(target.tokenizer("Lazy").input_ids)
    assert started == [prompt_length + PROBE_EVERY - 1]  # started at the first probe, with what was generated
    assert events[-1].stats.draft_tokens == 2 and len(draft_engine.sessions) == 0  # two probes (rounds 16 and 48); ended


def test_k_is_capped_by_the_drafts_own_limit_and_the_breaker_stays_closed(tiny_target):
    """A draft started with a smaller --max-speculative-tokens (2) than a request asks for (4):
    every round drafts 2, none is refused, and the draft's breaker stays closed. (Before K was
    resolved in one place, each such request went target-only and three opened the breaker.)"""
    from orchestrator.breaker import CLOSED
    from specdec.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    target = with_eos(tiny_target, ())
    stack = start_stack(target, ModelDrafter(target), draft_options={"max_speculative_tokens": 2}, draft_breaker_failures=3)
    try:
        with stack.channel("orchestrator") as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            for _ in range(4):
                reply = stub.Generate(orchestrator_pb2.GenerateRequest(prompt="Capped", max_new_tokens=12, num_speculative_tokens=4), timeout=60)
                assert reply.stats.num_speculative_tokens == 2
                assert reply.stats.draft_tokens == 2 * reply.stats.rounds and reply.stats.acceptance_rate == 1.0
                assert reply.stats.rounds == 4  # 3 tokens per round
        assert all(r.backend.breaker.state == CLOSED for r in stack.orchestrator.servicer.engine.draft.replicas)
    finally:
        stack.stop()
