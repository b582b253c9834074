"""Logit bias, penalties, min_p, stop_token_ids and ignore_eos under speculation.

The penalties make each position's distribution depend on the tokens before it, drafts included:
the target processes row j of a verify after the drafts before j, the draft does the same while
drafting. Proven here: the processing against a token-by-token reference and Hugging Face's
processors, the target's verdicts against the reference rejection sampler on the reference p,
greedy output equal to target-only (and to Hugging Face's generate for the repetition penalty),
the sampled output distribution equal to the target's, and a draft equal to the target accepted
every time (it processes its logits the same way).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

from draft_service.drafters.model import ModelDrafter
from draft_service.drafters.ngram import NGramDrafter
from draft_service.engine import DraftEngine
from harness.inprocess import in_process_engine, run_generation
from harness.tiny import tiny_lm, with_eos
from orchestrator.generation import GenerationRequest
from specdec import sampling
from specdec.errors import InvalidArgument
from specdec.messages import ProposeWork, VerifyWork
from specdec.sampling import History, SamplingParams
from target_service.engine import TargetEngine
from tests.helpers import joined
from tests.test_engines import full_logits, small  # noqa: F401 (a fixture)
from tests.test_sampling import hf_warp, reference_processing
from tests.test_speculation import PROMPT, assert_target_marginals, sample_many

PENALIZED = SamplingParams(
    0.9, top_k=10, min_p=0.02, repetition_penalty=1.6, presence_penalty=0.7, frequency_penalty=0.5, logit_bias=((2, 1.5), (7, -2.0)),
    min_tokens=4, end_token_ids=(7, 9),
)


def test_processing_follows_its_definition_and_hugging_faces_processors():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 40, generator=generator) * 3
    prompt, output = [1, 5, 5, 9], [9, 3, 3, 3, 12]
    ours = sampling.process_logits(logits, PENALIZED, History(prompt, output))
    torch.testing.assert_close(ours[0], reference_processing(logits[0], PENALIZED, prompt, output))
    # each part alone against Hugging Face's processor of it
    repetition = sampling.process_logits(logits, SamplingParams(1.0, repetition_penalty=1.6), History(prompt, output))
    hf = RepetitionPenaltyLogitsProcessor(1.6)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(repetition, hf)
    bias = sampling.process_logits(logits, SamplingParams(1.0, logit_bias=((2, 1.5), (7, -2.0))), History(prompt, output))
    hf = SequenceBiasLogitsProcessor({(2,): 1.5, (7,): -2.0})(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(bias, hf)
    # presence and frequency count output tokens only: the prompt's 5 is untouched, 3 loses 0.7 + 3 x 0.5
    openai = sampling.process_logits(logits, SamplingParams(1.0, presence_penalty=0.7, frequency_penalty=0.5), History(prompt, output))
    assert openai[0, 5] == logits[0, 5] and torch.isclose(openai[0, 3], logits[0, 3] - 0.7 - 1.5)


def test_each_row_counts_the_drafts_before_it():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 30, generator=generator)
    prompt, output, drafts = [1, 2], [3, 4, 4], [4, 8, 8]
    rows = sampling.process_logits(logits, PENALIZED, History(prompt, output), drafts)
    for j in range(4):
        torch.testing.assert_close(rows[j], reference_processing(logits[j], PENALIZED, prompt, output + drafts[:j]))


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
def test_target_verifies_against_the_processed_distribution_of_each_position(small, greedy):
    """Each verdict equals the reference rejection sampler on p built by the reference processing
    and Hugging Face's warpers, row by row after the drafts before it, for a session whose start
    already holds output (prompt_len)."""
    params = SamplingParams(0.0, repetition_penalty=1.6, presence_penalty=0.7, frequency_penalty=0.5, logit_bias=((2, 1.5),)) if greedy else PENALIZED
    generator = torch.Generator().manual_seed(9)
    engine, prompt, earlier_output, k = TargetEngine(small), [5, 9, 3, 7, 1], [7, 7, 2], 3
    sequence = prompt + earlier_output
    accepted = []
    for trial in range(30):
        drafts, draft_probs = [], []
        for _ in range(k):
            noisy = full_logits(small.model, sequence + drafts)[-1] + torch.randn(64, generator=generator)
            ids, probs = sampling.truncate_to_support(torch.softmax(noisy, -1)[None], 8)
            draft_probs.append((ids[0].int(), probs[0]))
            drafts.append(int(ids[0, torch.multinomial(probs[0], 1, generator=generator)]))
        uniforms = [] if greedy else torch.rand(k + 1, generator=generator).tolist()
        engine.start_session(f"s{trial}", sequence, prompt_len=len(prompt))
        work = VerifyWork(f"s{trial}", len(sequence) - 1, sequence[-1:], drafts, None if greedy else draft_probs, params, uniforms)
        verdict = engine.verify([work])[0]
        logits = full_logits(small.model, sequence + drafts)[len(sequence) - 1 :]  # [K+1, V]
        if greedy:
            best = [int(reference_processing(logits[j], params, prompt, earlier_output + drafts[:j]).argmax()) for j in range(k + 1)]
            expected_accepted = next((j for j in range(k) if drafts[j] != best[j]), k)
            assert (verdict.accepted, verdict.next_token) == (expected_accepted, best[expected_accepted])
        else:
            p = torch.cat([hf_warp(logits[j : j + 1], params, prompt, earlier_output + drafts[:j]) for j in range(k + 1)])
            q = torch.stack([sampling.densify(ids[None], probs[None], 64)[0] for ids, probs in draft_probs])
            assert verdict == sampling.reference_rejection_sample(p, drafts, q, uniforms)
        accepted.append(verdict.accepted)
    assert 0 < sum(accepted) < k * len(accepted)


def test_sampled_output_distribution_with_penalties_equals_the_targets():
    """The chi-square test of test_speculation with every processing on: 4 tokens per trial with
    K = 2, so drafts change the penalties of the positions after them within a round."""
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.1)
    draft = tiny_lm(seed=22, vocab_size=16, eos=(), init=0.1)
    prompt = [3, 1, 4, 1, 5]
    counts, stats = asyncio.run(sample_many(target, ModelDrafter(draft), prompt, PENALIZED, 2, 3, trials=2000))
    assert stats.accepted_tokens > 50 and stats.draft_tokens - stats.accepted_tokens > 50
    assert_target_marginals(counts, target, prompt, PENALIZED)


def test_a_draft_equal_to_the_target_is_accepted_with_penalties():
    """Only acceptance shows a draft that drafts without the penalties (exactness holds for any q)."""
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.1)
    _, stats = asyncio.run(sample_many(target, ModelDrafter(target), [3, 1, 4, 1, 5], PENALIZED, 3, 8, trials=40))
    assert stats.draft_tokens >= 200 and stats.accepted_tokens >= 0.99 * stats.draft_tokens


def test_a_reduced_draft_head_drafts_with_penalties_on_token_ids():
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.1)
    drafter = ModelDrafter(tiny_lm(seed=21, vocab_size=16, eos=(), init=0.1), head_ids=torch.tensor([0, 2, 3, 5, 8, 11, 13, 14]))
    engine = DraftEngine(drafter, max_context=target.max_context)
    engine.start_session("s", [3, 1, 4, 1, 5])
    params = SamplingParams(1.0, repetition_penalty=50.0, logit_bias=((0, -100.0), (2, -100.0), (3, -100.0)))
    proposal = engine.propose([ProposeWork("s", 4, [5], 6, params, [0.5] * 6)])[0][0]
    assert len(proposal.tokens) == 6 and set(proposal.tokens) <= {5, 8, 11, 13, 14}
    for (ids, probs), token in zip(proposal.distributions, proposal.tokens):
        assert set(ids[probs > 0].tolist()) <= {0, 2, 3, 5, 8, 11, 13, 14} and token in ids.tolist()  # the head's rows only
        assert float(probs[(ids == 0) | (ids == 2) | (ids == 3)].sum()) < 1e-30  # biased away


PENALTIES = {
    "repetition": dict(repetition_penalty=1.3),
    "openai": dict(presence_penalty=0.6, frequency_penalty=0.9),
    "all": dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5, logit_bias=((198, 3.0), (30, -5.0))),
}


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("penalty", list(PENALTIES))
def test_greedy_output_with_penalties_equals_target_only(tiny_target, penalty, k):
    target = with_eos(tiny_target, ())
    request = dict(prompt=PROMPT, max_new_tokens=24, **PENALTIES[penalty])
    baseline, _ = joined(run_generation(in_process_engine(target), GenerationRequest(num_speculative_tokens=0, **request)))
    plain, _ = joined(run_generation(in_process_engine(target), GenerationRequest(num_speculative_tokens=0, prompt=PROMPT, max_new_tokens=24)))
    assert baseline != plain  # the penalty changes this output
    for drafter in (ModelDrafter(target), NGramDrafter()):
        events = run_generation(in_process_engine(target, drafter), GenerationRequest(num_speculative_tokens=k, **request))
        assert joined(events)[0] == baseline
        if isinstance(drafter, ModelDrafter):
            assert events[-1].stats.acceptance_rate == 1.0
    if penalty == "repetition":
        prompt_ids = target.tokenizer(PROMPT).input_ids
        with torch.inference_mode():
            hf = target.model.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False, repetition_penalty=1.3,
                                       eos_token_id=None, pad_token_id=0)
        assert baseline == hf[0, len(prompt_ids) :].tolist()


def test_min_tokens_holds_back_eos_and_stop_token_ids_exactly(tiny_target):
    free, _ = joined(run_generation(in_process_engine(with_eos(tiny_target, ())), GenerationRequest(prompt=PROMPT, max_new_tokens=16)))
    position = next(i for i in range(2, 16) if free[i] not in free[:i])
    target = with_eos(tiny_target, (free[position],))
    for stops in ((), (free[1],)):
        request = dict(prompt=PROMPT, max_new_tokens=16, min_tokens=position + 2, stop_token_ids=stops)
        baseline = run_generation(in_process_engine(target), GenerationRequest(num_speculative_tokens=0, **request))
        ids = joined(baseline)[0]
        assert len(ids) >= position + 2 and free[position] not in ids[: position + 2] and (not stops or stops[0] not in ids[: position + 2])
        for drafter in (ModelDrafter(target), NGramDrafter()):
            events = run_generation(in_process_engine(target, drafter), GenerationRequest(num_speculative_tokens=4, **request))
            assert joined(events)[0] == ids


def test_stop_token_ids_end_generation_and_ignore_eos_goes_past_eos(tiny_target):
    free, _ = joined(run_generation(in_process_engine(with_eos(tiny_target, ())), GenerationRequest(prompt=PROMPT, max_new_tokens=16)))
    position = next(i for i in range(2, 16) if free[i] not in free[:i])
    request = GenerationRequest(prompt=PROMPT, max_new_tokens=16, num_speculative_tokens=4, stop_token_ids=(free[position],))
    events = run_generation(in_process_engine(with_eos(tiny_target, ()), ModelDrafter(tiny_target)), request)
    assert joined(events)[0] == free[:position] and events[-1].finish_reason == "stop"

    target = with_eos(tiny_target, (free[position],))
    stopped = run_generation(in_process_engine(target, ModelDrafter(target)), GenerationRequest(prompt=PROMPT, max_new_tokens=16))
    assert joined(stopped)[0] == free[:position] and stopped[-1].finish_reason == "eos"
    request = GenerationRequest(prompt=PROMPT, max_new_tokens=16, num_speculative_tokens=4, ignore_eos=True)
    events = run_generation(in_process_engine(target, ModelDrafter(target)), request)
    assert joined(events)[0] == free and events[-1].finish_reason == "length"


@pytest.mark.parametrize(
    "fields,field",
    [
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(logit_bias=((5, 101.0),)), "logit_bias"),
        (dict(logit_bias=((10**6, 1.0),)), "logit_bias"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids"),
        (dict(stop_token_ids=tuple(range(65))), "stop_token_ids"),
        (dict(min_tokens=5), "min_tokens"),
    ],
)
def test_bad_sampling_parameters_name_their_field(tiny_target, fields, field):
    with pytest.raises(InvalidArgument) as error:
        run_generation(in_process_engine(tiny_target), GenerationRequest(prompt=PROMPT, max_new_tokens=4, **fields))
    assert error.value.field == field


def test_services_refuse_logit_bias_outside_their_vocabulary(small):
    target = TargetEngine(small)
    target.start_session("s", [1, 2, 3])
    params = SamplingParams(1.0, logit_bias=((64, 1.0),))
    with pytest.raises(InvalidArgument) as error:
        target.verify([VerifyWork("s", 2, [3], [], None, params, [0.5])])
    assert error.value.field == "items[0].sampling.logit_bias"
    draft = DraftEngine(ModelDrafter(small), max_context=small.max_context)
    draft.start_session("s", [1, 2, 3])
    with pytest.raises(InvalidArgument) as error:
        draft.propose([ProposeWork("s", 2, [3], 2, params, [0.5, 0.5])])
    assert error.value.field == "items[0].sampling.logit_bias"
