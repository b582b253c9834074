"""Seed-stable sampling: each token is the Gumbel-max choice with noise of (seed, position).

Proven here: the noise is a function of seed and position alone; a Gumbel-max draw has p's
distribution; the target's verdicts follow the rule (accept a draft exactly when it equals the
target's own choice); the output distribution of the whole loop equals the target's (chi-square);
and a seeded output is identical across K = 0, 1, 4, 8, adaptive K, drafters, pipelined drafting and
batches of concurrent requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from draft_service.drafters.model import ModelDrafter
from draft_service.drafters.ngram import NGramDrafter
from harness.inprocess import in_process_engine, run_generation
from harness.tiny import tiny_lm, with_eos
from orchestrator.generation import GenerationRequest
from specdec import sampling
from specdec.messages import VerifyWork
from specdec.sampling import SamplingParams
from specdec.v1 import orchestrator_pb2
from target_service.engine import TargetEngine
from tests.helpers import joined
from tests.test_sampling import hf_warp
from tests.test_speculation import PROMPT, assert_target_marginals, chisquare_pvalue, sample_many

WARPED = SamplingParams(0.9, top_k=12, top_p=0.95)


def test_noise_depends_on_seed_and_position_alone():
    first = sampling.position_noise(7, [3, 4, 5], 100)
    assert torch.equal(first, sampling.position_noise(7, [3, 4, 5], 100))
    assert torch.equal(first[1:], sampling.position_noise(7, [4, 5], 100))  # the same whatever the rows around it
    assert not torch.equal(first[0], first[1]) and not torch.equal(first, sampling.position_noise(8, [3, 4, 5], 100))
    assert first.dtype == torch.float64 and bool(torch.isfinite(first).all())


def test_a_gumbel_max_draw_has_the_distribution_of_p():
    probs = torch.softmax(torch.randn(12, generator=torch.Generator().manual_seed(2)) * 1.5, -1)
    probs[3] = 0.0  # a zero-probability token is never chosen
    counts = torch.zeros(12)
    for seed in range(4000):
        counts[int(sampling.gumbel_scores(probs, sampling.position_noise(seed, [10], 12)[0]).argmax())] += 1
    assert counts[3] == 0
    support = probs > 0
    assert chisquare_pvalue(counts[support], probs[support]) > 1e-3


def test_the_target_accepts_a_draft_exactly_when_it_is_its_own_choice():
    small = tiny_lm(seed=5, vocab_size=64, max_context=256)
    engine, prompt, k = TargetEngine(small), [5, 9, 3, 7, 1], 3
    generator = torch.Generator().manual_seed(1)
    accepted = []
    for trial in range(40):
        params = dataclasses.replace(WARPED, position_seed=trial)
        drafts = torch.randint(64, (k,), generator=generator).tolist()
        with torch.inference_mode():
            logits = small.model(torch.tensor([prompt + drafts])).logits[0, len(prompt) - 1 :]  # [K+1, V]
        choices = [int(sampling.gumbel_scores(hf_warp(logits[j : j + 1], WARPED)[0], sampling.position_noise(trial, [len(prompt) + j], 64)[0]).argmax())
                   for j in range(k + 1)]
        if trial % 2:  # half the trials draft the target's own choices up to a point
            drafts = choices[: trial % 4] + drafts[trial % 4 :]
            with torch.inference_mode():
                logits = small.model(torch.tensor([prompt + drafts])).logits[0, len(prompt) - 1 :]
            choices = [int(sampling.gumbel_scores(hf_warp(logits[j : j + 1], WARPED)[0], sampling.position_noise(trial, [len(prompt) + j], 64)[0]).argmax())
                       for j in range(k + 1)]
        engine.start_session(f"s{trial}", prompt)
        verdict = engine.verify([VerifyWork(f"s{trial}", len(prompt) - 1, prompt[-1:], drafts, None, params, [])])[0]
        expected = next((j for j in range(k) if drafts[j] != choices[j]), k)
        assert (verdict.accepted, verdict.next_token) == (expected, choices[expected])
        accepted.append(verdict.accepted)
    assert 0 < sum(accepted) < k * len(accepted)


@pytest.mark.parametrize("params", [SamplingParams(1.0), WARPED], ids=["plain", "warped"])
def test_seed_stable_output_distribution_equals_the_targets(params):
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.1)
    draft = tiny_lm(seed=22, vocab_size=16, eos=(), init=0.1)
    prompt = [3, 1, 4, 1, 5]
    counts, stats = asyncio.run(sample_many(target, ModelDrafter(draft), prompt, params, 2, 3, trials=2000, seed_stable=True))
    assert stats.accepted_tokens > 50 and stats.draft_tokens - stats.accepted_tokens > 50
    assert_target_marginals(counts, target, prompt, params)


def test_a_draft_equal_to_the_target_is_always_accepted():
    """The draft uses the target's noise: with the target's own distribution it always agrees."""
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.1)
    _, stats = asyncio.run(sample_many(target, ModelDrafter(target), [3, 1, 4, 1, 5], WARPED, 3, 8, trials=30, seed_stable=True))
    assert stats.draft_tokens >= 150 and stats.accepted_tokens == stats.draft_tokens


def seeded(k, seed=11, **extra):
    return GenerationRequest(prompt=PROMPT, max_new_tokens=24, temperature=0.9, top_k=40, seed=seed, seed_stable=True,
                             num_speculative_tokens=k, **extra)


def test_the_output_is_the_same_for_every_k_drafter_and_policy(tiny_target, tiny_draft):
    target = with_eos(tiny_target, ())
    baseline, _ = joined(run_generation(in_process_engine(target), seeded(0)))
    assert baseline != joined(run_generation(in_process_engine(target), seeded(0, seed=12)))[0]
    for drafter in (ModelDrafter(target), ModelDrafter(tiny_draft), NGramDrafter()):
        for k in (1, 4, 8):
            assert joined(run_generation(in_process_engine(target, drafter), seeded(k)))[0] == baseline
    same = run_generation(in_process_engine(target, ModelDrafter(target)), seeded(4))
    assert same[-1].stats.acceptance_rate == 1.0
    adaptive = run_generation(in_process_engine(target, ModelDrafter(target)), seeded(None))  # adaptive K: the default
    assert joined(adaptive)[0] == baseline and adaptive[-1].stats.adaptive_k
    pipelined = in_process_engine(target, ModelDrafter(tiny_draft), pipeline_drafts=True)
    assert joined(run_generation(pipelined, seeded(4)))[0] == baseline


def test_the_output_is_the_same_in_a_batch_of_concurrent_requests(stack, orchestrator):
    """Eight requests at once through the services (the target fuses their rounds into batches),
    with different K, equal one by one."""
    def request(k, seed):
        fields = dict(prompt=PROMPT, max_new_tokens=24, temperature=0.9, top_k=40, seed=seed, seed_stable=True)
        if k is not None:
            fields["num_speculative_tokens"] = k
        return orchestrator.Generate(orchestrator_pb2.GenerateRequest(**fields), timeout=120)

    alone = {seed: list(request(0, seed).token_ids) for seed in (1, 2)}
    cases = [(k, seed) for k in (0, 1, 4, None) for seed in (1, 2)]
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda case: request(*case), cases))
    assert max(a.stats.rounds for a in answers) > 0
    for (k, seed), answer in zip(cases, answers):
        assert list(answer.token_ids) == alone[seed], (k, seed)
