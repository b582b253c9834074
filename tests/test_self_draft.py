"""A target that drafts for itself (target_service/self_draft.py, --self-draft): its first L layers
and an exit draft on the session's own cache, and the next Verify reuses the layers below L for
the tokens the draft fed. The verify's logits equal a full forward's over the same sequence, round
after round; output stays exact (greedy equality, the chi-square distribution test), with the
untrained exit and a trained one; the target serves both APIs and the orchestrator drafts on it."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from draft_service.drafters.early_exit import ExitConfig, ExitNet
from draft_service.engine import DraftEngine
from harness.inprocess import in_process_engine, run_generation, start_stack
from harness.tiny import tiny_lm, with_eos
from orchestrator.generation import GenerationRequest
from specdec import lm, sampling
from specdec.errors import FailedPrecondition, NotFound
from specdec.messages import ProposeWork, VerifyWork
from target_service.engine import TargetEngine
from target_service.self_draft import SelfDraft, SelfDrafter, parse
from tests.helpers import bad_request_fields, joined
from tests.test_speculation import PROMPT, assert_target_marginals, hf_greedy, sample_many


def shallow_top(loaded, layers: int, scale: float = 0.05):
    """Damp the residual updates of the layers from `layers` on, so that the state after the first
    ones nearly decides the output: self-drafts are then accepted often, and rejected at times."""
    for layer in loaded.model.model.layers[layers:]:
        layer.self_attn.o_proj.weight.data.mul_(scale)
        layer.mlp.down_proj.weight.data.mul_(scale)
    return loaded


def self_drafting(target, spec: str) -> tuple[TargetEngine, DraftEngine]:
    engine = TargetEngine(target, self_draft=SelfDraft(target.model, *parse(spec)))
    engine.self_draft.build_exit()
    return engine, DraftEngine(SelfDrafter(engine), max_context=target.max_context)


def test_the_verify_with_reused_layers_equals_a_full_forward():
    """Rounds of self-draft and verify (greedy, some drafts rejected): every verify's logits equal
    those of the same tokens fed to a fresh cache in one full forward pass (float32, 1e-5), and
    the layers below L were reused for all but the last draft token of each round."""
    target = shallow_top(tiny_lm(seed=3, vocab_size=48, eos=(), layers=4, hidden=64, init=0.2), 2)
    engine, drafts = self_drafting(target, "2")
    calls = []
    original = engine.self_draft.verify_forward

    def recording(caches, tokens, spans):
        logits, states = original(caches, tokens, spans)
        calls.append((list(tokens[0]), logits[0]))
        return logits, states

    engine.self_draft.verify_forward = recording
    prompt = [5, 9, 2, 7, 7, 1, 30, 4]
    engine.start_session("s", prompt)
    drafts.start_session("s", prompt)
    reference = lm.SequenceCache()
    lm.forward(target.model, [reference], [prompt[:-1]])
    sequence, agreed, pending, rejected = list(prompt), len(prompt) - 1, prompt[-1:], 0
    for _ in range(8):
        proposal = drafts.propose([ProposeWork("s", agreed, pending, 4, sampling.GREEDY, [])])[0][0]
        before = engine.self_draft.reused_positions
        verdict = engine.verify([VerifyWork("s", len(sequence) - 1, sequence[-1:], proposal.tokens, None, sampling.GREEDY, [])])[0]
        assert engine.self_draft.reused_positions - before == 4  # the pending token and three drafts
        fed, logits = calls[-1]
        torch.testing.assert_close(logits, lm.forward(target.model, [reference], [fed])[0], atol=1e-5, rtol=1e-5)
        reference.truncate(len(sequence) + verdict.accepted)
        agreed, pending = len(sequence) + verdict.accepted, [verdict.next_token]
        sequence += proposal.tokens[: verdict.accepted] + [verdict.next_token]
        rejected += verdict.accepted < 4
    assert 0 < rejected < 8


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("exit_kind", ["untrained", "trained"])
def test_self_drafting_greedy_output_equals_target_only(tmp_path, tokenizer, k, exit_kind):
    target = shallow_top(tiny_lm(seed=1, vocab_size=len(tokenizer), tokenizer=tokenizer, eos=(), layers=4), 2)
    spec = "2"
    if exit_kind == "trained":  # an exit layer (here: layer 2's weights, scaled) with its own cache, on a reduced vocabulary
        net = ExitNet.initialized(ExitConfig("unused", 2), target.model, torch.arange(0, len(tokenizer), 3))
        net.body.layers[0].mlp.down_proj.weight.data.mul_(0.5)
        net.save(tmp_path / "exit")
        spec = str(tmp_path / "exit")
    request = GenerationRequest(prompt=PROMPT, max_new_tokens=24, num_speculative_tokens=k)
    events = run_generation(in_process_engine(target, self_draft=spec), request)
    assert joined(events)[0] == hf_greedy(target, tokenizer(PROMPT).input_ids, 24)
    assert events[-1].stats.accepted_tokens > 0


@pytest.mark.slow  # about 30 s each
@pytest.mark.parametrize("params", [sampling.SamplingParams(1.0), sampling.SamplingParams(0.8, top_k=6, top_p=0.9)], ids=["plain", "warped"])
def test_self_drafting_keeps_the_targets_distribution(params):
    """Chi-square of 2,000 sampled generations against the target's exact marginals, the target
    drafting with its first 2 of 4 layers."""
    target = shallow_top(tiny_lm(seed=21, vocab_size=16, eos=(), init=0.6, layers=4), 2, scale=0.3)
    engine = TargetEngine(target, self_draft=SelfDraft(target.model, 2, None))
    engine.self_draft.build_exit()
    prompt = [3, 1, 4, 1, 5]
    counts, stats = asyncio.run(sample_many(target, SelfDrafter(engine), prompt, params, 3, 4, trials=2000, target_engine=engine))
    assert stats.accepted_tokens > 300 and stats.draft_tokens - stats.accepted_tokens > 300
    assert_target_marginals(counts, target, prompt, params)


def test_the_target_serves_its_own_drafts_over_grpc(tokenizer):
    """--self-draft: the target's server also serves DraftService (health SERVING, model info),
    the orchestrator's --draft is the target itself, output equals target-only, no session is
    left, and a request for target features is refused with the field named."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from harness.probes import wait_for_sessions
    from specdec.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, target_pb2_grpc

    target = with_eos(shallow_top(tiny_lm(seed=1, vocab_size=len(tokenizer), tokenizer=tokenizer, eos=(), layers=4), 2), ())
    stack = start_stack(target, self_draft="2")
    try:
        with stack.channel("target") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="specdec.v1.DraftService"), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as refused:
                target_pb2_grpc.TargetServiceStub(channel).StartSession(
                    common_pb2.StartSessionRequest(session_id="f", prompt_token_ids=[1, 2], feature_layers=[1]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(refused.value) == ["feature_layers"]
        with stack.channel("orchestrator") as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            ask = lambda k: orchestrator_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=16, num_speculative_tokens=k)  # noqa: E731
            baseline, speculative = stub.Generate(ask(0), timeout=60), stub.Generate(ask(3), timeout=60)
        assert list(speculative.token_ids) == list(baseline.token_ids)
        assert speculative.stats.accepted_tokens > 0
        assert wait_for_sessions(stack) == (0, 0)
    finally:
        stack.stop()


def test_self_draft_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--self-draft takes L"):
        parse("nonsense")
    with pytest.raises(ValueError, match="0 < L < 4"):
        SelfDraft(tiny_lm(seed=1, vocab_size=16, eos=(), layers=4).model, 4, None)
    assert parse("3") == (3, None)
    target = tiny_lm(seed=1, vocab_size=16, eos=(), layers=4)
    engine, drafts = self_drafting(target, "2")
    drafts.start_session("alone", [1, 2, 3])
    with pytest.raises(NotFound, match="unknown session 'alone'"):  # the target never started it
        drafts.propose([ProposeWork("alone", 2, [3], 2, sampling.GREEDY, [])])
    engine.start_session("s", [1, 2, 3])
    drafts.start_session("s", [1, 5, 4])
    with pytest.raises(FailedPrecondition, match="not the draft's sequence"):
        drafts.propose([ProposeWork("s", 2, [4], 2, sampling.GREEDY, [])])
