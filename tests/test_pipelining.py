"""Pipelined drafting (orchestrator/speculation.py, --pipeline-drafts): the next round's Propose
runs during this round's Verify on the guess that every draft is accepted and the bonus token is
the draft's next one. Output stays exactly target-only's (greedy) and the target's distribution
(sampling); the guess is used when it holds and dropped when it does not; the Propose really is
in flight while the target verifies; a generation that ends leaves no call behind."""

from __future__ import annotations

import asyncio

import pytest

from draft_service.drafters.model import ModelDrafter
from draft_service.drafters.ngram import NGramDrafter
from harness.inprocess import in_process_engine, run_generation
from harness.tiny import tiny_lm, with_eos
from orchestrator.generation import GenerationRequest
from specdec import sampling
from tests.helpers import joined
from tests.test_speculation import PROMPT, assert_target_marginals, hf_greedy, sample_many


def generate(target, drafter, k, pipeline, max_new_tokens=24):
    engine = in_process_engine(target, drafter, pipeline_drafts=pipeline)
    events = run_generation(engine, GenerationRequest(prompt=PROMPT, max_new_tokens=max_new_tokens, num_speculative_tokens=k))
    return *joined(events), events[-1].stats


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("draft", ["same_as_target", "random_model", "ngram"])
def test_pipelined_greedy_output_equals_target_only(tiny_target, tiny_draft, draft, k):
    target = with_eos(tiny_target, ())
    make = {"same_as_target": lambda: ModelDrafter(target), "random_model": lambda: ModelDrafter(tiny_draft), "ngram": NGramDrafter}[draft]
    plain_ids, plain_text, plain = generate(target, make(), k, pipeline=False)
    ids, text, stats = generate(target, make(), k, pipeline=True)
    assert ids == plain_ids == hf_greedy(target, target.tokenizer(PROMPT).input_ids, 24) and text == plain_text
    assert stats.rounds == plain.rounds and stats.accepted_tokens == plain.accepted_tokens
    if draft == "same_as_target":  # every guess holds: only the first round waits for its Propose
        assert stats.pipelined_rounds == stats.rounds - 1
    if draft == "random_model":
        assert stats.pipelined_rounds < stats.rounds // 2
    assert plain.pipelined_rounds == 0


@pytest.mark.slow  # 40-50 s each
@pytest.mark.parametrize("params", [sampling.SamplingParams(1.0), sampling.SamplingParams(0.8, top_k=6, top_p=0.9)], ids=["plain", "warped"])
def test_pipelined_sampling_keeps_the_targets_distribution(params):
    """Chi-square of 2,000 sampled generations against the target's exact marginals, with a draft
    close enough to the target, and distributions peaked enough, that many guesses of the bonus
    token hold (the pipelined path is taken) and many fail."""
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.6)
    draft = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.6)
    draft.model.model.layers[0].mlp.down_proj.weight.data.mul_(3.0)  # near the target, not equal
    prompt, steps = [3, 1, 4, 1, 5], 4
    counts, stats = asyncio.run(sample_many(target, ModelDrafter(draft), prompt, params, 1, steps, trials=2000, pipeline=True))
    assert stats.pipelined_rounds > 300 and stats.rounds - stats.pipelined_rounds > 300
    assert_target_marginals(counts, target, prompt, params)


class Recorder:
    """Wraps a backend and records when each Propose or Verify starts and ends (event-loop order)."""

    def __init__(self, backend, log, delay_s=0.0):
        self.backend, self.log, self.delay_s = backend, log, delay_s

    def __getattr__(self, attribute):
        return getattr(self.backend, attribute)

    async def _recorded(self, kind, call, work, timeout):
        self.log.append((kind, "start"))
        await asyncio.sleep(self.delay_s)
        result = await call(work, timeout)
        self.log.append((kind, "end"))
        return result

    async def propose(self, work, timeout):
        return await self._recorded("propose", self.backend.propose, work, timeout)

    async def verify(self, work, timeout):
        return await self._recorded("verify", self.backend.verify, work, timeout)


@pytest.mark.parametrize("pipeline", [False, True])
def test_the_next_propose_is_in_flight_while_the_target_verifies(tiny_target, pipeline):
    target = with_eos(tiny_target, ())
    engine = in_process_engine(target, ModelDrafter(target), pipeline_drafts=pipeline)
    log = []
    engine.target = Recorder(engine.target, log, delay_s=0.01)
    engine.draft = Recorder(engine.draft, log)
    ids, _ = joined(run_generation(engine, GenerationRequest(prompt=PROMPT, max_new_tokens=12, num_speculative_tokens=2)))
    assert len(ids) == 12
    overlapped = sum(1 for before, after in zip(log, log[1:]) if before == ("verify", "start") and after == ("propose", "start"))
    assert (overlapped > 0) == pipeline


def test_a_generation_that_ends_leaves_no_call_in_flight(tiny_target):
    """The last round's Propose ahead (there is one whenever tokens were left) is cancelled and
    awaited: no task outlives the request, and the draft's next request is served."""
    target = with_eos(tiny_target, ())
    engine = in_process_engine(target, ModelDrafter(target), pipeline_drafts=True)

    async def run():
        request = GenerationRequest(prompt=PROMPT, max_new_tokens=10, num_speculative_tokens=3, stop=["fox"])
        first = [event async for event in engine.stream(request)]
        second = [event async for event in engine.stream(GenerationRequest(prompt=PROMPT, max_new_tokens=10, num_speculative_tokens=3))]
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        return first, second, pending

    first, second, pending = asyncio.run(run())
    assert not pending and first and joined(second)[0] == hf_greedy(target, target.tokenizer(PROMPT).input_ids, 10)
