"""Logprobs: each output token's log-probability under the target and its top-n alternatives, from
the target's distribution at the committed position, so speculation changes nothing. Exactness
(greedy speculative = target-only = a fresh forward of the output), sampled tokens, the warped
distribution, sorting and n, bad n, and the gRPC API and Python client (the HTTP API: test_http.py)."""

from __future__ import annotations

import grpc
import pytest
import torch

from draft_service.drafters.model import ModelDrafter
from harness.inprocess import in_process_engine, run_generation
from harness.tiny import with_eos
from orchestrator.generation import GenerationEvent, GenerationRequest
from specdec import sampling
from specdec.errors import InvalidArgument
from specdec.v1 import common_pb2, orchestrator_pb2, target_pb2, target_pb2_grpc
from specdec_client import Client, Request
from tests.helpers import bad_request_fields

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown"
TOP = 5


def fresh_log_softmax(loaded, prompt_ids: list[int], ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: log_softmax of one forward pass over prompt + output, at the positions that
    predict each output token."""
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt_ids + ids])).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)


def generate(engine, k: int, **fields) -> GenerationEvent:
    fields = {"prompt": PROMPT, "max_new_tokens": 24, "logprobs": TOP, **fields}
    return GenerationEvent.joined(run_generation(engine, GenerationRequest(num_speculative_tokens=k, **fields)))


class LastDraftWrong(ModelDrafter):
    """The target as its own draft, but each proposal's last token is off by one: rounds accept all
    but the last draft, so the committed rows are a proper prefix of the scored ones."""

    def propose(self, sessions, work):
        proposals, passes = super().propose(sessions, work)
        for proposal in proposals:  # the last draft token never enters the draft's cache
            proposal.tokens[-1] = (proposal.tokens[-1] + 1) % self.loaded.vocab_size
        return proposals, passes


@pytest.mark.parametrize("draft", ["same_as_target", "last_draft_wrong", "random_model"])
def test_greedy_speculative_logprobs_equal_target_only_and_a_fresh_forward(tiny_target, tiny_draft, draft):
    target = with_eos(tiny_target, ())
    drafter = {"same_as_target": lambda: ModelDrafter(target), "last_draft_wrong": lambda: LastDraftWrong(target),
               "random_model": lambda: ModelDrafter(tiny_draft)}[draft]()
    baseline = generate(in_process_engine(target), k=0)
    speculative = generate(in_process_engine(target, drafter), k=4)
    assert speculative.token_ids == baseline.token_ids and len(baseline.logprobs.logprobs) == 24
    rate = speculative.stats.acceptance_rate
    assert {"same_as_target": rate == 1.0, "last_draft_wrong": 0.5 < rate < 1, "random_model": rate < 0.2}[draft]
    assert torch.allclose(torch.tensor(speculative.logprobs.logprobs), torch.tensor(baseline.logprobs.logprobs), atol=1e-4)
    assert speculative.logprobs.top_token_ids == baseline.logprobs.top_token_ids
    assert torch.allclose(torch.tensor(speculative.logprobs.top_logprobs), torch.tensor(baseline.logprobs.top_logprobs), atol=1e-4)
    fresh = fresh_log_softmax(target, target.tokenizer(PROMPT).input_ids, baseline.token_ids)
    chosen = fresh.gather(1, torch.tensor(baseline.token_ids).unsqueeze(1)).squeeze(1)
    assert torch.allclose(torch.tensor(speculative.logprobs.logprobs), chosen, atol=1e-4)
    top = torch.topk(fresh, TOP, dim=-1)
    assert torch.allclose(torch.tensor(speculative.logprobs.top_logprobs), top.values, atol=1e-4)
    # greedy: the output token is the most probable one
    assert [ids[0] for ids in speculative.logprobs.top_token_ids] == speculative.token_ids


def test_sampled_tokens_logprobs_are_the_targets_distribution_raw_and_warped(tiny_target, tiny_draft):
    target = with_eos(tiny_target, ())
    params = sampling.SamplingParams(temperature=0.8, top_k=40, top_p=0.9)
    fields = dict(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=3)
    prompt_ids = target.tokenizer(PROMPT).input_ids
    # drafts accepted then a bonus token; drafts rejected then a token drawn from the residual
    for drafter, accepted in ((ModelDrafter(target), lambda a: a > 12), (ModelDrafter(tiny_draft), lambda a: a < 4)):
        for warped in (False, True):
            event = generate(in_process_engine(target, drafter), k=4, warped_logprobs=warped, **fields)
            assert accepted(event.stats.accepted_tokens) and len(event.logprobs.logprobs) == 24
            fresh = fresh_log_softmax(target, prompt_ids, event.token_ids)
            expected = sampling.warp(fresh, params).log() if warped else fresh
            ids = torch.tensor(event.token_ids).unsqueeze(1)
            assert torch.allclose(torch.tensor(event.logprobs.logprobs), expected.gather(1, ids).squeeze(1), atol=1e-4)
            assert torch.allclose(torch.tensor(event.logprobs.top_logprobs), torch.topk(expected, TOP, -1).values, atol=1e-4)
            if warped:  # a sampled token is inside the warped support
                assert all(v > float("-inf") for v in event.logprobs.logprobs)


def test_top_n_is_sorted_n_respected_and_none_unless_asked(tiny_target):
    engine = in_process_engine(with_eos(tiny_target, ()))
    for n in (0, 1, 3, 20):
        logprobs = generate(engine, k=0, max_new_tokens=6, logprobs=n).logprobs
        assert len(logprobs.logprobs) == 6 and all(len(ids) == len(v) == n for ids, v in zip(logprobs.top_token_ids, logprobs.top_logprobs))
        assert all(v == sorted(v, reverse=True) and len(set(ids)) == n for ids, v in zip(logprobs.top_token_ids, logprobs.top_logprobs))
        assert all(v <= 0 for row in logprobs.top_logprobs for v in row)
    assert generate(engine, k=0, max_new_tokens=6, logprobs=None).logprobs is None
    for n in (-1, 21):
        with pytest.raises(InvalidArgument) as error:
            generate(engine, k=0, logprobs=n)
        assert error.value.field == "logprobs"


def test_logprobs_over_grpc_and_the_python_client(stack, orchestrator, tiny_target):
    request = orchestrator_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=12, num_speculative_tokens=4, logprobs=3)
    whole = orchestrator.Generate(request, timeout=60)
    parts = list(orchestrator.GenerateStream(request, timeout=60))
    assert len(whole.logprobs) == len(whole.token_ids) == 12
    assert [p.logprob for p in whole.logprobs] == [t.logprob for part in parts for t in part.logprobs]
    assert all(len(p.logprobs) == len(p.token_ids) for p in parts)
    baseline = orchestrator.Generate(orchestrator_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=12, num_speculative_tokens=0, logprobs=3), timeout=60)
    assert torch.allclose(torch.tensor([p.logprob for p in whole.logprobs]), torch.tensor([p.logprob for p in baseline.logprobs]), atol=1e-4)
    assert [list(p.top_token_ids) for p in whole.logprobs] == [list(p.top_token_ids) for p in baseline.logprobs]
    assert not orchestrator.Generate(orchestrator_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=4), timeout=60).logprobs
    for n in (-1, 21):
        bad = orchestrator_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=4, logprobs=n)
        for call in (orchestrator.Generate, lambda r, timeout: list(orchestrator.GenerateStream(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as error:
                call(bad, timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(error.value)[0] == "logprobs"

    with Client(stack.address("orchestrator"), timeout=60) as client:
        completion = client.generate(Request(prompt=PROMPT, max_new_tokens=12, num_speculative_tokens=4, logprobs=3))
        assert [t.logprob for t in completion.logprobs] == [p.logprob for p in whole.logprobs]
        assert all(len(t.top_token_ids) == len(t.top_logprobs) == 3 for t in completion.logprobs)
        deltas = list(client.generate_stream(Request(prompt=PROMPT, max_new_tokens=12, logprobs=0)))
        assert sum(len(d.logprobs) for d in deltas) == 12 and all(not t.top_token_ids for d in deltas for t in d.logprobs)


def test_verify_item_logprobs_rows_are_the_committed_tokens_and_bad_n_names_the_item(stack):
    with stack.channel("target") as channel:
        target = target_pb2_grpc.TargetServiceStub(channel)
        target.StartSession(common_pb2.StartSessionRequest(session_id="lp", prompt_token_ids=[1, 2, 3]), timeout=10)
        try:
            greedy = common_pb2.SamplingParams(top_p=1)
            for n in (-1, 21):
                item = target_pb2.VerifyItem(session_id="lp", prefix_len=2, tokens=[3], sampling=greedy, logprobs=n)
                with pytest.raises(grpc.RpcError) as error:
                    target.Verify(target_pb2.VerifyRequest(items=[item]), timeout=10)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(error.value)[0] == "items[0].logprobs"
            item = target_pb2.VerifyItem(session_id="lp", prefix_len=2, tokens=[3], draft_tokens=[4, 5], sampling=greedy, logprobs=2)
            result = target.Verify(target_pb2.VerifyRequest(items=[item]), timeout=10).results[0]
            assert len(result.logprobs.logprobs) == 4 * (result.accepted + 1)
            assert len(result.logprobs.top_token_ids) == len(result.logprobs.top_logprobs) == 4 * 2 * (result.accepted + 1)
            plain = target_pb2.VerifyItem(session_id="lp", prefix_len=3 + result.accepted, tokens=[result.next_token], sampling=greedy)
            assert not target.Verify(target_pb2.VerifyRequest(items=[plain]), timeout=10).results[0].HasField("logprobs")
        finally:
            target.EndSession(common_pb2.EndSessionRequest(session_id="lp"), timeout=10)
