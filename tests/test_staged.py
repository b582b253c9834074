"""Staged speculation (draft_service/drafters/staged.py): a first stage drafts for the draft model,
which checks its guesses in one pass. Every token and every q it sends is the one the second stage
alone would send for the same uniforms, over rounds with rollbacks, in every sampling mode; so
speculation stays exact (greedy equality, the chi-square distribution test) and only the second
stage's forward passes are saved."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from draft_service.drafters.model import ModelDrafter
from draft_service.drafters.ngram import NGramDrafter
from draft_service.drafters.staged import StagedDrafter, parse_spec
from draft_service.engine import DraftEngine
from draft_service.server import DraftConfig, build_drafter
from harness.inprocess import in_process_engine, run_generation
from harness.tiny import tiny_lm, with_eos
from orchestrator.generation import GenerationRequest
from specdec import lm, sampling
from specdec.messages import ProposeWork
from tests.helpers import joined
from tests.test_speculation import PROMPT, assert_target_marginals, hf_greedy, sample_many

MODES = {
    "greedy": sampling.GREEDY,
    "sampled": sampling.SamplingParams(1.0),
    "warped": sampling.SamplingParams(0.8, top_k=6, top_p=0.9, repetition_penalty=1.2),
    "position-keyed": sampling.SamplingParams(1.0, position_seed=7),
}


def first_stages(vocab_size: int):
    """A first stage that often guesses right (the second stage's own model), one that rarely does
    (another random model) and n-gram lookup."""
    return {
        "same-model": lambda second: ModelDrafter(second),
        "other-model": lambda second: ModelDrafter(tiny_lm(seed=5, vocab_size=vocab_size, eos=())),
        "ngram": lambda second: NGramDrafter(3, 1),
    }


def play(engine: DraftEngine, params: sampling.SamplingParams, rounds: int, seed: int) -> list:
    """Rounds of Propose as the orchestrator sends them, the target accepting a random number of
    drafts and adding a random token; returns every proposal (tokens and q)."""
    rng = random.Random(seed)
    engine.start_session("s", [3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4])
    length, tokens, seen = 11 - 1, [4], []
    for _ in range(rounds):
        k = rng.randint(1, 5)
        uniforms = [rng.random() for _ in range(k)]
        proposal = engine.propose([ProposeWork("s", length, tokens, k, params, uniforms)])[0][0]
        seen.append((proposal.tokens, [(ids.tolist(), probs) for ids, probs in proposal.distributions or []]))
        accepted = rng.randint(0, k)
        length += len(tokens) + accepted
        tokens = [rng.randrange(12)]
    return seen


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("first", ["same-model", "other-model", "ngram"])
def test_the_staged_drafter_sends_what_the_second_stage_alone_sends(mode, first):
    second = tiny_lm(seed=4, vocab_size=12, eos=(), init=0.8)
    alone = play(DraftEngine(ModelDrafter(second)), MODES[mode], rounds=16, seed=1)
    staged = play(DraftEngine(StagedDrafter(first_stages(12)[first](second), ModelDrafter(second))), MODES[mode], rounds=16, seed=1)
    # the same tokens, and the same q up to float rounding (one pass over several rows against one per row)
    assert [tokens for tokens, _ in staged] == [tokens for tokens, _ in alone]
    for (_, staged_q), (_, alone_q) in zip(staged, alone):
        assert [ids for ids, _ in staged_q] == [ids for ids, _ in alone_q]
        assert all(torch.allclose(a, b, atol=1e-5) for (_, a), (_, b) in zip(staged_q, alone_q))
    assert sum(len(tokens) for tokens, _ in alone) > 35


def test_guesses_that_hold_save_the_second_stages_passes(monkeypatch):
    """A first stage that always guesses right (the second stage's own model, greedy): one pass
    of the second stage per round instead of K; n-gram guesses cost no pass of their own."""
    second = tiny_lm(seed=4, vocab_size=12, eos=(), init=0.8)
    passes_of_second = []
    original = lm.forward
    monkeypatch.setattr(lm, "forward", lambda model, *a, **kw: (passes_of_second.append(model is second.model), original(model, *a, **kw))[1])
    copy = tiny_lm(seed=4, vocab_size=12, eos=(), init=0.8)  # the same weights, another model object
    engine = DraftEngine(StagedDrafter(ModelDrafter(copy), ModelDrafter(second)))
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    engine.start_session("s", prompt)
    passes_of_second.clear()
    engine.propose([ProposeWork("s", len(prompt) - 1, [prompt[-1]], 4, sampling.GREEDY, [])])
    assert sum(passes_of_second) == 1 and len(passes_of_second) == 1 + 3  # the first stage drafts 3 guesses, one pass each

    engine = DraftEngine(StagedDrafter(NGramDrafter(3, 1), ModelDrafter(second)))
    engine.start_session("s", prompt)
    proposals, passes = engine.propose([ProposeWork("s", len(prompt) - 1, [prompt[-1]], 4, sampling.GREEDY, [])])
    assert 1 <= passes <= 4 and len(proposals[0].tokens) == 4


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("first", ["same-model", "other-model", "ngram"])
def test_staged_greedy_output_equals_target_only(tiny_target, tiny_draft, first, k):
    target = with_eos(tiny_target, ())
    second = ModelDrafter(tiny_draft)
    make_first = {"same-model": lambda: ModelDrafter(tiny_draft), "other-model": lambda: ModelDrafter(target), "ngram": NGramDrafter}[first]
    engine = in_process_engine(target, StagedDrafter(make_first(), second))
    events = run_generation(engine, GenerationRequest(prompt=PROMPT, max_new_tokens=24, num_speculative_tokens=k))
    ids, _ = joined(events)
    assert ids == hf_greedy(target, target.tokenizer(PROMPT).input_ids, 24)
    assert events[-1].stats.rounds >= 24 // (k + 1)


@pytest.mark.slow  # about 40 s each
@pytest.mark.parametrize("params", [sampling.SamplingParams(1.0), sampling.SamplingParams(0.8, top_k=6, top_p=0.9)], ids=["plain", "warped"])
def test_staged_sampling_keeps_the_targets_distribution(params):
    """Chi-square of 2,000 sampled generations against the target's exact marginals; the first
    stage (a near copy of the second) guesses right often and wrong often."""
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.6)
    second = tiny_lm(seed=22, vocab_size=16, eos=(), init=0.6)
    first = tiny_lm(seed=22, vocab_size=16, eos=(), init=0.6)
    first.model.model.layers[0].mlp.down_proj.weight.data.mul_(3.0)
    prompt = [3, 1, 4, 1, 5]
    counts, _ = asyncio.run(sample_many(target, StagedDrafter(ModelDrafter(first), ModelDrafter(second)), prompt, params, 3, 4, trials=2000))
    assert_target_marginals(counts, target, prompt, params)


def test_staged_specs_are_parsed_and_checked():
    assert parse_spec("staged:ngram+smollm2-draft-l6") == ("ngram", "smollm2-draft-l6")
    assert parse_spec("smollm2-draft-l6") is None
    for bad in ("staged:ngram", "staged:+x", "staged:x+"):
        with pytest.raises(ValueError, match="staged:FIRST\\+SECOND"):
            parse_spec(bad)
    with pytest.raises(ValueError, match="second stage .* must be a draft model"):
        build_drafter(DraftConfig(model="staged:ngram+ngram"))
    with pytest.raises(ValueError, match="vocabularies differ"):
        StagedDrafter(ModelDrafter(tiny_lm(seed=1, vocab_size=10, eos=())), ModelDrafter(tiny_lm(seed=1, vocab_size=12, eos=())))
