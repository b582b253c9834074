"""The speculation loop and generation logic in-process (engines called directly): greedy equality
with every kind of draft, the sampled output distribution of the whole system, and the edge cases
of a round (EOS inside a draft, max_new_tokens mid-round, stops across rounds, the context limit)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import pytest
import torch
from scipy.stats import chisquare

from draft_service.drafters.model import ModelDrafter
from draft_service.drafters.ngram import NGramDrafter
from draft_service.engine import DraftEngine
from harness.inprocess import in_process_engine, run_generation
from harness.tiny import tiny_lm, with_eos
from orchestrator.backends import InProcessDraft, InProcessTarget
from orchestrator.generation import GenerationRequest
from orchestrator.policy import FixedK
from orchestrator.speculation import Speculation, speculate
from orchestrator.stats import GenerationStats
from orchestrator.tree_policy import FixedTree
from specdec import lm, sampling
from specdec.errors import InvalidArgument
from target_service.engine import TargetEngine
from tests.helpers import joined
from tests.test_sampling import hf_warp

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown"


def hf_greedy(loaded, prompt_ids, n):
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids) :].tolist()


def greedy(generator, k, max_new_tokens=24, prompt=PROMPT, **extra):
    events = run_generation(generator, GenerationRequest(prompt=prompt, max_new_tokens=max_new_tokens, num_speculative_tokens=k, **extra))
    ids, text = joined(events)
    return ids, text, events[-1]


def all_accepted_per_position(max_new_tokens: int, k: int) -> list[int]:
    """accepted_per_position when every draft is accepted: each round drafts min(K, left - 1)."""
    counts, left = [0] * k, max_new_tokens
    while left > 0:
        drafted = min(k, left - 1)
        counts[:drafted] = [c + 1 for c in counts[:drafted]]
        left -= drafted + 1
    return counts


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("draft", ["same_as_target", "random_model", "ngram"])
def test_greedy_speculative_output_equals_target_only(tiny_target, tiny_draft, draft, k):
    target = with_eos(tiny_target, ())
    drafter = {"same_as_target": lambda: ModelDrafter(target), "random_model": lambda: ModelDrafter(tiny_draft), "ngram": NGramDrafter}[draft]()
    baseline_ids, baseline_text, baseline_last = greedy(in_process_engine(target), k=0)
    ids, text, last = greedy(in_process_engine(target, drafter), k=k)
    prompt_ids = target.tokenizer(PROMPT).input_ids
    assert baseline_ids == hf_greedy(target, prompt_ids, 24)
    assert ids == baseline_ids and text == baseline_text
    assert baseline_last.stats.tokens_per_target_forward == 1.0 and baseline_last.stats.draft_tokens == 0
    if draft == "same_as_target":
        assert last.stats.acceptance_rate == 1.0
        assert last.stats.tokens_per_target_forward > 1.0
        assert last.stats.accepted_per_position == all_accepted_per_position(24, k)
    if draft == "random_model":
        assert last.stats.acceptance_rate < 0.2


def test_max_new_tokens_reached_mid_round(tiny_target):
    target = with_eos(tiny_target, ())
    baseline_ids, _, _ = greedy(in_process_engine(target), k=0, max_new_tokens=7)
    ids, _, last = greedy(in_process_engine(target, ModelDrafter(target)), k=4, max_new_tokens=7)
    # Round 1 commits 4 drafts + bonus = 5 tokens; round 2 may draft only 1 to end at exactly 7.
    assert ids == baseline_ids and len(ids) == 7
    assert last.finish_reason == "length"
    assert (last.stats.rounds, last.stats.draft_tokens, last.stats.generated_tokens) == (2, 5, 7)


def test_eos_inside_a_draft_ends_generation_there(tiny_target):
    free_ids, _, _ = greedy(in_process_engine(with_eos(tiny_target, ())), k=0, max_new_tokens=12)
    # The first token (from position 2 on) that did not occur before becomes the EOS token; with a
    # perfect draft and K=4 it sits inside a round's accepted drafts.
    position = next(i for i in range(2, 12) if free_ids[i] not in free_ids[:i])
    target = with_eos(tiny_target, (free_ids[position],))
    ids, text, last = greedy(in_process_engine(target, ModelDrafter(target)), k=4, max_new_tokens=12)
    assert ids == free_ids[:position]
    assert last.finish_reason == "eos"
    assert last.stats.generated_tokens == position
    assert last.stats.committed_tokens > position  # the round went on past the EOS
    assert text == target.tokenizer.decode(free_ids[:position])


def test_stop_string_spanning_two_rounds(tiny_target):
    target = with_eos(tiny_target, ())
    free_ids, free_text, _ = greedy(in_process_engine(target), k=0, max_new_tokens=20)
    decode = target.tokenizer.decode
    # K=2 with a perfect draft commits 3 tokens per round: tokens 2 and 3 belong to rounds 1 and 2.
    boundary = len(decode(free_ids[:3]))
    stop = free_text[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and decode(free_ids[:2]) != free_text[:boundary]
    expected = free_text[: free_text.find(stop)]
    events = run_generation(
        in_process_engine(target, ModelDrafter(target)),
        GenerationRequest(prompt=PROMPT, max_new_tokens=20, num_speculative_tokens=2, stop=(stop,)),
    )
    ids, text = joined(events)
    assert text == expected
    assert events[-1].finish_reason == "stop"
    assert all(stop not in e.text for e in events)


def test_the_stop_string_can_be_kept_and_special_tokens_shown(tiny_target):
    target = with_eos(tiny_target, ())
    _, free_text, _ = greedy(in_process_engine(target), k=0, max_new_tokens=20)
    stop = free_text[8:12]
    request = GenerationRequest(prompt=PROMPT, max_new_tokens=20, num_speculative_tokens=2, stop=(stop,), include_stop_str_in_output=True)
    events = run_generation(in_process_engine(target, ModelDrafter(target)), request)
    assert joined(events)[1] == free_text[: free_text.find(stop) + len(stop)] and events[-1].finish_reason == "stop"
    special = dict(prompt=PROMPT, max_new_tokens=3, logit_bias=((2, 100.0),))  # <|im_end|>, not an EOS of this target
    assert joined(run_generation(in_process_engine(target), GenerationRequest(**special)))[1] == ""
    assert joined(run_generation(in_process_engine(target), GenerationRequest(skip_special_tokens=False, **special)))[1] == "<|im_end|>" * 3


def test_prompt_at_the_context_limit(tokenizer):
    target = tiny_lm(seed=1, vocab_size=len(tokenizer), tokenizer=tokenizer, max_context=64, eos=())
    prompt = " a" * 80
    ids = tokenizer(prompt).input_ids
    fitting = tokenizer.decode(ids[:63])
    assert len(tokenizer(fitting).input_ids) == 63
    generator = in_process_engine(target, ModelDrafter(target))
    events = run_generation(generator, GenerationRequest(prompt=fitting, max_new_tokens=1, num_speculative_tokens=4))
    assert len(joined(events)[0]) == 1 and events[-1].finish_reason == "length"
    with pytest.raises(InvalidArgument) as error:
        run_generation(generator, GenerationRequest(prompt=fitting, max_new_tokens=2, num_speculative_tokens=4))
    assert error.value.field == "max_new_tokens"
    with pytest.raises(InvalidArgument) as error:
        run_generation(generator, GenerationRequest(prompt=tokenizer.decode(ids[:64]), max_new_tokens=1))
    assert error.value.field == "prompt"


def test_streamed_text_never_splits_multibyte_characters(tokenizer):
    """Byte-level BPE spells many characters with several tokens; a stream must hold the partial
    bytes back. Feed the ids of a multilingual text token by token through TextStream."""
    from orchestrator.text import TextStream

    text = "Grüße aus Köln 🐍🚀 — 日本語のテキスト, emoji 👩‍👩‍👧 done"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, [])
    deltas = []
    for token in ids:
        stream.add(token)
        deltas.append(stream.release())
    deltas.append(stream.release(final=True))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(ids) > len([d for d in deltas if d])  # some tokens were partial characters


def test_sampling_is_reproducible_with_a_seed(tiny_target, tiny_draft):
    target = with_eos(tiny_target, ())
    request = GenerationRequest(prompt=PROMPT, max_new_tokens=16, temperature=0.9, top_k=50, seed=1234, num_speculative_tokens=3)
    first = joined(run_generation(in_process_engine(target, ModelDrafter(tiny_draft)), request))
    second = joined(run_generation(in_process_engine(target, ModelDrafter(tiny_draft)), request))
    assert first == second


def exact_target_marginals(loaded, prompt, params, steps, allowed=None):
    """P(token at step s) for s < steps, by enumerating every prefix (vocab 16: 16 + 256 contexts).
    Warped by Hugging Face's processors, not sampling.warp, so that a warping bug shows here too.
    `allowed(prefix)`: the tokens a grammar allows after it ([V] bool), the others masked out."""
    vocab = loaded.vocab_size
    marginals = []
    prefixes = {(): 1.0}
    for _ in range(steps):
        dist = torch.zeros(vocab, dtype=torch.float64)
        next_prefixes = {}
        for prefix, weight in prefixes.items():
            # the forward path the services run, in the model's weight format
            logits = lm.forward(loaded.model, [lm.SequenceCache()], [prompt + list(prefix)], logits_for_last=1)[0][-1]
            if allowed is not None:
                logits = logits.masked_fill(~allowed(prefix), float("-inf"))
            p = hf_warp(logits[None], params, prompt, prefix)[0].double()
            dist += weight * p
            for token in range(vocab):
                if p[token] > 0:
                    next_prefixes[prefix + (token,)] = weight * float(p[token])
        marginals.append(dist)
        prefixes = next_prefixes
    return marginals


def chisquare_pvalue(observed: torch.Tensor, probabilities: torch.Tensor) -> float:
    observed = observed.double().numpy()
    expected = (probabilities.double() / probabilities.double().sum()).numpy() * observed.sum()
    return chisquare(observed, expected).pvalue


def assert_target_marginals(counts: torch.Tensor, target, prompt, params) -> None:
    """Each step's histogram (counts [steps, V]) stays on the target's support and matches its
    exact marginal (chi-square)."""
    for step, exact in enumerate(exact_target_marginals(target, prompt, params, len(counts))):
        support = exact > 1e-9
        assert counts[step][~support].sum() == 0
        assert chisquare_pvalue(counts[step][support], exact[support]) > 1e-3, f"step {step}"


async def sample_many(target, drafter, prompt, params, k, steps, trials, make_policy=None, pipeline=False, seed_stable=False,
                      grammar=None, grammars=None, target_engine=None, tree=None):
    """Histograms of `trials` sampled generations; each round drafts `k` tokens, or as many as
    `make_policy()`'s policy says (one policy per trial). A feature drafter gets the target's
    features as through the orchestrator. `pipeline`: rounds proposed ahead (Speculation.pipeline).
    `seed_stable`: seed-stable sampling, each trial's seed its number. `grammar`: the output's,
    compiled by `grammars` (a GrammarCompiler for models without a tokenizer). `target_engine`:
    the target's engine when the drafter needs it (a self-drafting target's). `tree`: draft trees
    of this shape (trees.TreeShape), k deep."""
    target_engine, draft_engine = target_engine or TargetEngine(target), DraftEngine(drafter, max_context=target.max_context)
    target_engine._grammars = draft_engine._grammars = grammars
    target_backend, draft_backend = InProcessTarget(target_engine), InProcessDraft(draft_engine)
    counts = torch.zeros(steps, target.vocab_size)
    stats = GenerationStats()
    for trial in range(trials):
        sid = f"s{trial}"
        target_engine.start_session(sid, prompt, feature_layers=drafter.feature_layers, grammar=grammar)
        draft_engine.start_session(sid, prompt, grammar=grammar)
        policy = make_policy() if make_policy else FixedK(k)
        trial_params = dataclasses.replace(params, position_seed=trial) if seed_stable else params
        spec = Speculation(sid, prompt, trial_params, policy, steps, torch.Generator().manual_seed(trial), draft_started=True,
                           feature_layers=drafter.feature_layers, pipeline=pipeline, tree=FixedTree(tree) if tree else None)
        tokens = [t async for round_tokens, _ in speculate(spec, target_backend, draft_backend, stats) for t in round_tokens]
        for step, token in enumerate(tokens):
            counts[step, token] += 1
        target_engine.end_session(sid)
        draft_engine.end_session(sid)
    return counts, stats


@pytest.mark.parametrize(
    "params,max_support,head_ids",
    [
        (sampling.SamplingParams(1.0), 64, None),
        (sampling.SamplingParams(0.8, top_k=6, top_p=0.9), 64, None),
        (sampling.SamplingParams(1.0), 4, None),
        (sampling.SamplingParams(1.0), 64, [0, 2, 3, 5, 8, 11, 13, 14]),
    ],
    ids=["plain", "warped", "truncated_draft", "reduced_draft_vocabulary"],
)
def test_sampled_output_distribution_equals_the_targets(params, max_support, head_ids):
    """The whole loop (drafting, verification, rollback, bonus tokens), 3 tokens per trial with
    K=2: each position's histogram must match the target's exact marginal (chi-square). A draft
    whose head covers half the vocabulary must not hide the other half."""
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.1)  # flat enough for many tokens to be in play
    draft = tiny_lm(seed=22, vocab_size=16, eos=(), init=0.1)
    prompt, steps = [3, 1, 4, 1, 5], 3
    drafter = ModelDrafter(draft, max_support, torch.tensor(head_ids) if head_ids else None)
    counts, stats = asyncio.run(sample_many(target, drafter, prompt, params, 2, steps, trials=2000))
    assert stats.accepted_tokens > 50 and stats.draft_tokens - stats.accepted_tokens > 50  # both paths are exercised
    assert_target_marginals(counts, target, prompt, params)


@pytest.mark.slow  # 15-20 s each; the fast suite keeps the float32 cases above and test_weights' greedy checks
@pytest.mark.parametrize(
    "format,params",
    [(f, sampling.SamplingParams(1.0)) for f in ("bfloat16", "int8", "int4", "q4_1", "q8_0")]
    + [(f, sampling.SamplingParams(0.8, top_k=6, top_p=0.9)) for f in ("int4", "q4_1")],
    ids=["bfloat16", "int8", "int4", "q4_1", "q8_0", "int4-warped", "q4_1-warped"],
)
def test_sampled_output_distribution_equals_the_targets_in_every_weight_format(format, params):
    """The chi-square test above with target and draft in a quantized weight format: the output
    is the distribution of the target in that format."""
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.1)
    draft = tiny_lm(seed=22, vocab_size=16, eos=(), init=0.1)
    for model in (target.model, draft.model):
        lm.use_format(model, format)
    prompt, steps = [3, 1, 4, 1, 5], 3
    counts, stats = asyncio.run(sample_many(target, ModelDrafter(draft), prompt, params, 2, steps, trials=2000))
    assert stats.accepted_tokens > 50 and stats.draft_tokens - stats.accepted_tokens > 50
    assert_target_marginals(counts, target, prompt, params)


def test_drafts_without_distributions_are_point_masses_when_sampling():
    """n-gram drafts are deterministic; sampling with them must still be exact."""
    target = tiny_lm(seed=31, vocab_size=8, eos=(), init=0.1)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    params = sampling.SamplingParams(1.0)
    counts, stats = asyncio.run(sample_many(target, NGramDrafter(), prompt, params, 3, 2, trials=2000))
    assert stats.draft_tokens > 0
    for step, exact in enumerate(exact_target_marginals(target, prompt, params, 2)):
        assert chisquare_pvalue(counts[step], exact) > 1e-3


def test_a_draft_equal_to_the_target_is_accepted_when_sampling_with_warping():
    """Exactness holds for any q, so only acceptance shows a draft that samples from an unwarped
    distribution (against the warped p it is accepted about a third of the time)."""
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.1)
    params = sampling.SamplingParams(0.8, top_k=6, top_p=0.9)
    _, stats = asyncio.run(sample_many(target, ModelDrafter(target), [3, 1, 4, 1, 5], params, 3, 8, trials=50))
    assert stats.draft_tokens >= 250 and stats.accepted_tokens >= 0.99 * stats.draft_tokens


class ScriptedK(FixedK):
    """K from a list, round after round."""

    def __init__(self, ks: list[int]):
        super().__init__(max(ks))
        self.ks = itertools.cycle(ks)

    def next_k(self) -> int:
        return next(self.ks)


def test_after_rounds_at_k_zero_the_draft_is_sent_what_it_lacks_and_keeps_the_rest():
    """Rounds at K = 0 leave the draft behind, even before its session starts (at the first round
    that drafts). Each Propose must extend what the draft holds to the whole sequence, rolling back
    only the pending token its start included: the target as its own draft then has every draft
    accepted."""
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.1)
    prompt, steps = [3, 1, 4, 1, 5], 18
    target_engine, draft_engine = TargetEngine(target), DraftEngine(ModelDrafter(target), max_context=target.max_context)
    held = []  # per Propose: what the draft holds when it arrives

    class Recorded(InProcessDraft):
        async def propose(self, work, timeout):
            held.append((work, list(draft_engine.sessions.get(work.session_id).ids)))
            return await super().propose(work, timeout)

    async def generate():
        target_engine.start_session("s", prompt)
        spec = Speculation("s", prompt, sampling.GREEDY, ScriptedK([0, 0, 2, 0, 0, 0, 3, 1, 0, 2]), steps, torch.Generator())
        stats = GenerationStats()
        rounds = speculate(spec, InProcessTarget(target_engine), Recorded(draft_engine), stats)
        return [t async for tokens, _ in rounds for t in tokens], stats

    tokens, stats = asyncio.run(generate())
    sequence = prompt + tokens
    assert tokens == hf_greedy(target, prompt, steps)
    assert (stats.draft_tokens, stats.accepted_tokens) == (8, 8)
    assert [len(ids) - work.prefix_len for work, ids in held] == [1, 0, 0, 0]
    for work, ids in held:
        extended = ids[: work.prefix_len] + work.tokens
        assert extended == sequence[: len(extended)]
