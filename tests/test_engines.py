"""The model-side engines without gRPC: batched forwards over ragged caches, the draft's rollback
and all-accepted bookkeeping, n-gram drafting against Hugging Face's, sessions and their limits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from draft_service.drafters.model import ModelDrafter, restrict_head
from draft_service.drafters.ngram import lookup
from draft_service.engine import DraftEngine
from harness.tiny import tiny_lm
from specdec import lean_llama, lm, sampling
from specdec.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from specdec.messages import ProposeWork, VerifyWork
from specdec.sessions import SessionLimits, SessionStore
from target_service.engine import TargetEngine
from tests.test_sampling import hf_warp


@pytest.fixture(scope="module")
def small():
    return tiny_lm(seed=5, vocab_size=64, max_context=256)


def full_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("forward", [lm.forward, lm.forward_padded], ids=["packed", "padded"])
def test_batched_forward_over_ragged_caches_matches_unbatched(small, forward):
    """Both batched paths: the packed lean path (Llama models) and transformers with padding."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 64, (50,), generator=generator).tolist(), torch.randint(0, 64, (80,), generator=generator).tolist()
    cache_a, cache_b, cache_c = lm.SequenceCache(), lm.SequenceCache(), lm.SequenceCache()
    lm.forward(small.model, [cache_a], [a[:45]], logits_for_last=1)
    lm.forward(small.model, [cache_b], [b[:70]])
    out = forward(small.model, [cache_a, cache_b, cache_c], [a[45:], b[70:], a[:3]])
    torch.testing.assert_close(out[0], full_logits(small.model, a)[45:], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[1], full_logits(small.model, b)[70:], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[2], full_logits(small.model, a[:3]), atol=1e-4, rtol=1e-5)
    assert (cache_a.length, cache_b.length, cache_c.length) == (50, 80, 3)
    cache_a.truncate(47)
    out = forward(small.model, [cache_a, cache_b], [a[47:49], [1]])
    torch.testing.assert_close(out[0], full_logits(small.model, a[:49])[47:], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[1], full_logits(small.model, b + [1])[80:], atol=1e-4, rtol=1e-5)


def test_a_cache_knows_its_size_as_it_grows(small):
    """The size kept as buffers are made equals the buffers' bytes: through writes that add and
    grow layers (the lean path), and through reserve (the native formats)."""
    actual = lambda cache: sum(t.numel() * t.element_size() for t in cache.keys + cache.values)  # noqa: E731
    written = lm.SequenceCache()
    for tokens in ([1, 2, 3], list(range(40)), [5] * 90):
        lm.forward(small.model, [written], [tokens])
        assert written.nbytes == actual(written) > 0
    reserved = lm.SequenceCache()
    for needed in (10, 17, 200):
        reserved.reserve(3, 2, 8, needed, torch.float32)
        assert reserved.nbytes == actual(reserved) == 2 * 3 * 2 * 8 * 4 * reserved.keys[0].shape[2]


@pytest.mark.parametrize("reduced_head", [False, True])
def test_lean_llama_path_matches_transformers(small, reduced_head):
    """The lean single-sequence path: same logits as transformers' forward through a prefill,
    multi-token extensions (the K+1 tokens of a verify), rollbacks, and with a reduced draft head."""
    model = copy.deepcopy(small.model)
    if reduced_head:
        restrict_head(model, torch.tensor([0, 3, 7, 9, 20, 41, 63]))
    assert lean_llama.supports_lean_path(model)
    lean = lean_llama.LeanLlama(model)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (60,), generator=generator).tolist()
    fast, reference = lm.SequenceCache(), lm.SequenceCache()
    for chunk, rollback in ((ids[:40], 0), (ids[40:45], 2), (ids[43:44], 0), (ids[44:50], 3), (ids[47:48], 0)):
        torch.testing.assert_close(
            lean.forward([fast], [chunk])[0], lm.forward_transformers(model, reference, chunk, None, "cpu"), atol=5e-5, rtol=1e-5
        )  # the lean path attends per query (batch invariance), transformers with one masked call
        fast.truncate(fast.length - rollback)
        reference.truncate(reference.length - rollback)
    last = lean.forward([fast], [ids[48:49]], 1)[0]  # the cache now holds ids[:49] after all the rollbacks
    torch.testing.assert_close(last, lm.forward_transformers(model, reference, ids[48:49], 1, "cpu"))
    torch.testing.assert_close(last, full_logits(model, ids[:49])[-1:], atol=1e-5, rtol=1e-5)


def greedy_continuation(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(full_logits(model, ids)[-1].argmax()))
    return ids[-n:]


def test_model_drafter_rolls_back_and_catches_up_after_all_accepted(small):
    engine = DraftEngine(ModelDrafter(small), max_context=256)
    prompt = [5, 9, 3, 7, 1]
    engine.start_session("s", prompt)
    first, _ = engine.propose([ProposeWork("s", 4, [1], 3, sampling.GREEDY, [])])
    assert first[0].tokens == greedy_continuation(small.model, prompt, 3)
    # One draft accepted, then a different token: the rest must be rolled back.
    sequence = prompt + first[0].tokens[:1] + [11]
    second, passes = engine.propose([ProposeWork("s", 6, [11], 4, sampling.GREEDY, [])])
    assert second[0].tokens == greedy_continuation(small.model, sequence, 4)
    assert passes == 4
    # Every draft accepted: the last draft token never entered the cache and must be fed now.
    sequence = sequence + second[0].tokens + [13]
    third, _ = engine.propose([ProposeWork("s", 11, [13], 2, sampling.GREEDY, [])])
    assert third[0].tokens == greedy_continuation(small.model, sequence, 2)
    assert engine.sessions.get("s").state.length == len(sequence) + 1


def test_model_drafter_sends_the_distribution_it_sampled_from(small):
    engine = DraftEngine(ModelDrafter(small, max_support=8), max_context=256)
    engine.start_session("s", [1, 2, 3])
    params = sampling.SamplingParams(temperature=0.8)
    proposal = engine.propose([ProposeWork("s", 2, [3], 3, params, [0.1, 0.5, 0.9])])[0][0]
    assert len(proposal.tokens) == 3 and len(proposal.distributions) == 3
    for token, (ids, probs) in zip(proposal.tokens, proposal.distributions):
        assert ids.shape == probs.shape == (8,)
        assert token in ids.tolist()
        assert abs(float(probs.sum()) - 1) < 1e-5


def test_draft_engine_rejects_a_prefix_it_does_not_hold(small):
    engine = DraftEngine(ModelDrafter(small), max_context=256)
    engine.start_session("s", [1, 2, 3])
    with pytest.raises(FailedPrecondition) as error:
        engine.propose([ProposeWork("s", 9, [3], 2, sampling.GREEDY, [])])
    assert error.value.field == "items[0].prefix_len"


@pytest.mark.parametrize("seed", range(20))
def test_ngram_lookup_matches_hugging_face_prompt_lookup(seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (int(torch.randint(2, 40, (1,), generator=generator)),), generator=generator)
    hf = PromptLookupCandidateGenerator(num_output_tokens=4, max_matching_ngram_size=3, max_length=1000)
    candidates, _ = hf.get_candidates(ids[None])
    assert lookup(ids.tolist(), 4, max_ngram=3) == candidates[0, len(ids) :].tolist()


def test_target_engine_checks_prefix_and_session(small):
    engine = TargetEngine(small)
    engine.start_session("s", [1, 2, 3])
    with pytest.raises(FailedPrecondition):
        engine.verify([VerifyWork("s", 5, [3], [], None, sampling.GREEDY, [])])
    with pytest.raises(NotFound) as error:
        engine.verify([VerifyWork("nope", 2, [3], [], None, sampling.GREEDY, [])])
    assert error.value.field == "items[0].session_id"
    with pytest.raises(InvalidArgument) as error:
        engine.verify([VerifyWork("s", 2, [3], [], None, sampling.GREEDY, []), VerifyWork("s", 2, [3], [], None, sampling.GREEDY, [])])
    assert error.value.field == "items[1].session_id"


def test_target_engine_verifies_a_batch_of_sessions_like_one_at_a_time(small):
    prompts = {"a": [1, 2, 3, 4, 5, 6, 7], "b": [9, 8], "c": [4, 4, 4, 4]}
    drafts = {"a": [3, 5, 7], "b": [], "c": [1, 1]}
    batched, single = TargetEngine(small), TargetEngine(small)
    for sid, prompt in prompts.items():
        batched.start_session(sid, prompt)
        single.start_session(sid, prompt)
    work = [VerifyWork(sid, len(p) - 1, [p[-1]], drafts[sid], None, sampling.GREEDY, []) for sid, p in prompts.items()]
    assert batched.verify(work) == [single.verify([w])[0] for w in work]


@pytest.mark.parametrize(
    "params",
    [sampling.SamplingParams(1.0, top_k=3), sampling.SamplingParams(0.7, top_p=0.6), sampling.SamplingParams(1.2, top_k=8, top_p=0.8)],
)
def test_target_verifies_against_its_warped_distribution(small, params):
    """p is the warped distribution, not the softmax: each verdict equals the reference rejection
    sampler on Hugging Face's warp of the target's logits, for drafts that sample near the target
    (so some are accepted) from a sparse q."""
    generator = torch.Generator().manual_seed(9)
    engine, prompt, k = TargetEngine(small), [5, 9, 3, 7, 1], 3
    accepted = []
    for trial in range(30):
        drafts, draft_probs = [], []
        for _ in range(k):
            noisy = full_logits(small.model, prompt + drafts)[-1] + torch.randn(64, generator=generator)
            ids, probs = sampling.truncate_to_support(torch.softmax(noisy, -1)[None], 8)
            draft_probs.append((ids[0].int(), probs[0]))
            drafts.append(int(ids[0, torch.multinomial(probs[0], 1, generator=generator)]))
        uniforms = torch.rand(k + 1, generator=generator).tolist()
        engine.start_session(f"s{trial}", prompt)
        verdict = engine.verify([VerifyWork(f"s{trial}", len(prompt) - 1, prompt[-1:], drafts, draft_probs, params, uniforms)])[0]
        p = hf_warp(full_logits(small.model, prompt + drafts)[len(prompt) - 1 :], params)  # [K+1, V]
        q = torch.stack([sampling.densify(ids[None], probs[None], 64)[0] for ids, probs in draft_probs])
        assert verdict == sampling.reference_rejection_sample(p, drafts, q, uniforms)
        accepted.append(verdict.accepted)
    assert 0 < sum(accepted) < k * len(accepted)


def test_session_store_expires_idle_sessions_and_enforces_limits():
    now = [0.0]
    store = SessionStore(SessionLimits(max_sessions=2, max_bytes=100, ttl_s=10), size_of=lambda s: s, clock=lambda: now[0])
    store.add("a", 40)
    store.add("b", 40)
    with pytest.raises(ResourceExhausted):
        store.add("c", 1)
    with pytest.raises(ResourceExhausted):
        store.check_budget(21)
    now[0] = 5.0
    store.get("a")  # refreshes a's TTL
    now[0] = 12.0
    assert store.expire() == ["b"]
    assert store.get("a") == 40 and len(store) == 1
    with pytest.raises(InvalidArgument):
        store.add("a", 1)
