"""The sampling math: warping against Hugging Face's processors, the fast rejection sampler against
the slow reference, the greedy shortcut against the general path, and the statistical proof that
speculative sampling reproduces the target distribution (the method of vLLM's rejection-sampler
tests: many trials, a fixed p and q, compare the output histogram with p)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from specdec import sampling
from specdec.sampling import GREEDY, SamplingParams


def reference_processing(logits: torch.Tensor, params: SamplingParams, prompt=(), output=()) -> torch.Tensor:
    """The definition of the logit processing for one row [V] after `prompt` + `output`, token by
    token: the bias, the end tokens while the output is shorter than min_tokens, then the
    repetition penalty on every token seen, then the frequency and presence penalties per output
    token."""
    scores = logits.float().clone()
    for token, bias in params.logit_bias:
        scores[token] += bias
    if len(output) < params.min_tokens:
        for token in params.end_token_ids:
            scores[token] = float("-inf")
    if params.repetition_penalty != 1.0:
        for token in set(prompt) | set(output):
            value = float(scores[token])
            scores[token] = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
    for token in set(output):
        scores[token] -= params.frequency_penalty * list(output).count(token) + params.presence_penalty
    return scores


def hf_warp(logits: torch.Tensor, params: SamplingParams, prompt=(), output=()) -> torch.Tensor:
    """p of rows [N, V] that all follow `prompt` + `output`: the reference processing, then
    Hugging Face's warpers."""
    scores = torch.stack([reference_processing(row, params, prompt, output) for row in logits])
    scores = TemperatureLogitsWarper(params.temperature)(None, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    if params.min_p > 0:
        scores = MinPLogitsWarper(params.min_p)(None, scores)
    return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(1.0),
        SamplingParams(0.7),
        SamplingParams(1.3, top_k=5),
        SamplingParams(0.4, top_k=8),
        SamplingParams(0.9, top_p=0.8),
        SamplingParams(0.5, top_p=0.9),
        SamplingParams(1.0, top_p=0.99),
        SamplingParams(0.6, top_k=20, top_p=0.5),
        SamplingParams(1.0, top_k=5, top_p=0.5),
        SamplingParams(1.5, top_k=12, top_p=0.7),
        SamplingParams(1.0, top_k=1),
        SamplingParams(2.0, top_k=1, top_p=0.3),
        SamplingParams(1.0, top_k=50, top_p=0.99),
        SamplingParams(1.0, top_p=0.05),
        SamplingParams(1.0, min_p=0.1),
        SamplingParams(0.7, top_k=20, min_p=0.3),
        SamplingParams(1.3, top_p=0.9, min_p=0.05),
    ],
)
# Flat logits too: on peaked ones top-k and top-p keep the same few tokens in either order.
@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["flat", "peaked"])
def test_warp_matches_hugging_face(params, scale):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * scale
    ours = sampling.warp(logits, params)
    torch.testing.assert_close(ours, hf_warp(logits, params), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.sum(-1), torch.ones(6))


def test_top_k_of_one_is_the_greedy_point_mass_at_any_temperature():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    for params in (SamplingParams(0.3, top_k=1), SamplingParams(5.0, top_k=1, top_p=0.9)):
        assert torch.equal(sampling.warp(logits, params), sampling.warp(logits, GREEDY))


def test_greedy_warp_is_point_mass_on_first_argmax():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0]])
    assert sampling.warp(logits, GREEDY).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_sample_inverts_the_cdf_and_skips_zero_probability_tokens():
    probs = torch.tensor([0.25, 0.0, 0.5, 0.25])
    draws = [int(sampling.sample(probs, torch.tensor(u))) for u in (0.0, 0.2499, 0.25, 0.7499, 0.75, 0.9999)]
    assert draws == [0, 0, 2, 2, 3, 3]


def random_case(generator: torch.Generator, k: int, vocab: int, point_mass: bool, equal: bool, sparse: bool):
    p = torch.softmax(torch.randn(k + 1, vocab, generator=generator) * 2, -1)
    if sparse:  # truncated supports, like top-k/top-p warping produces
        p = p * (torch.rand(k + 1, vocab, generator=generator) > 0.5)
        p[:, 0] += 1e-3
        p = p / p.sum(-1, keepdim=True)
    q = p[:k].clone() if equal else torch.softmax(torch.randn(k, vocab, generator=generator) * 2, -1)
    drafts = torch.multinomial(q, 1, generator=generator).squeeze(1)
    if point_mass:
        q = None
    uniforms = torch.rand(k + 1, generator=generator)
    return p, drafts, q, uniforms


@pytest.mark.parametrize("point_mass", [False, True])
@pytest.mark.parametrize("equal", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_fast_rejection_sampler_matches_reference(point_mass, equal, sparse):
    generator = torch.Generator().manual_seed(hash((point_mass, equal, sparse)) % 2**31)
    for _ in range(200):
        k = int(torch.randint(0, 6, (1,), generator=generator))
        p, drafts, q, uniforms = random_case(generator, k, 12, point_mass, equal and not point_mass, sparse)
        fast = sampling.rejection_sample(p[None], drafts[None], None if q is None else q[None], uniforms[None])[0]
        slow = sampling.reference_rejection_sample(p, drafts.tolist(), q, uniforms.tolist())
        assert fast == slow


def test_batched_rows_are_independent():
    generator = torch.Generator().manual_seed(7)
    cases = [random_case(generator, 3, 10, False, False, False) for _ in range(16)]
    p, drafts, q, uniforms = (torch.stack([c[i] for c in cases]) for i in range(4))
    batched = sampling.rejection_sample(p, drafts, q, uniforms)
    assert batched == [sampling.rejection_sample(*(t[i : i + 1] for t in (p, drafts, q, uniforms)))[0] for i in range(16)]


def test_greedy_verify_equals_rejection_sampling_with_point_masses():
    generator = torch.Generator().manual_seed(3)
    for _ in range(300):
        k = int(torch.randint(0, 6, (1,), generator=generator))
        logits = torch.randn(1, k + 1, 8, generator=generator)
        best = logits.argmax(-1)[0]
        # Drafts that follow the argmax for a random number of positions, then diverge.
        drafts = best[:k].clone()
        cut = int(torch.randint(0, k + 1, (1,), generator=generator))
        if cut < k:
            drafts[cut] = (drafts[cut] + 1) % 8
        general = sampling.rejection_sample(sampling.warp(logits, GREEDY), drafts[None], None, torch.rand(1, k + 1, generator=generator))
        assert sampling.greedy_verify(logits, drafts[None]) == general


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_argmax_equals_torch_argmax_on_ties_and_nan(dtype):
    generator = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 4, (3, 5, 49), generator=generator).to(dtype)  # many ties
    scores[1, 2, 7] = float("nan")
    scores[2, 0, :] = float("-inf")
    fast = sampling.argmax(scores)
    assert fast.dtype == torch.long and torch.equal(fast, scores.argmax(-1))
    assert torch.equal(sampling.argmax(scores[0, 0]), scores[0, 0].argmax(-1))  # one row: a 0-d tensor


def test_p_equal_q_accepts_every_draft():
    generator = torch.Generator().manual_seed(4)
    for _ in range(200):
        p, drafts, q, uniforms = random_case(generator, 4, 16, point_mass=False, equal=True, sparse=False)
        assert sampling.rejection_sample(p[None], drafts[None], q[None], uniforms[None])[0].accepted == 4


def test_rejected_draft_token_is_never_the_recovered_token_when_q_is_a_point_mass():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    for u in torch.linspace(0.5, 0.99, 20):  # p(x=1) = 0.5: rejected for every u >= 0.5
        verdict = sampling.rejection_sample(p[None], torch.tensor([[1]]), None, torch.tensor([[float(u), 0.7]]))[0]
        assert verdict == sampling.Verdict(0, 0)


def test_a_rejection_that_rounding_leaves_without_residual_draws_from_p():
    """q a hair above p everywhere and a uniform just below 1: the draft is rejected, yet
    max(p - q, 0) is all zero. Drawing from those zeros would give the last token, which p rules out."""
    p = torch.tensor([[0.3, 0.7, 0.0], [0.2, 0.3, 0.5]])
    q = p[:1] * (1 + 1e-6)
    assert (p[0] - q[0]).clamp(min=0).sum() == 0
    for u in (0.0, 0.5, 0.9999):
        uniforms = [0.99999994, u]
        verdict = sampling.rejection_sample(p[None], torch.tensor([[1]]), q[None], torch.tensor([uniforms]))[0]
        assert verdict.accepted == 0 and p[0, verdict.next_token] > 0
        assert verdict == sampling.reference_rejection_sample(p, [1], q, uniforms)


def test_truncate_to_support_keeps_the_most_probable_tokens():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    ids, kept = sampling.truncate_to_support(probs, 2)
    assert ids.tolist() == [[1, 3]]
    torch.testing.assert_close(kept, torch.tensor([[0.4 / 0.7, 0.3 / 0.7]]))
    torch.testing.assert_close(sampling.densify(ids, kept, 4), torch.tensor([[0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7]]))


def speculative_histogram(p: torch.Tensor, q: torch.Tensor | None, k: int, trials: int, seed: int) -> torch.Tensor:
    """Counts of every emitted token (accepted drafts + recovered/bonus) over `trials` rounds with
    the same p at every position: each emitted token is then an independent draw from p."""
    generator = torch.Generator().manual_seed(seed)
    vocab = p.shape[-1]
    draft_dist = q if q is not None else torch.nn.functional.one_hot(torch.tensor(1), vocab).float()
    drafts = torch.multinomial(draft_dist.expand(trials * k, vocab), 1, replacement=True, generator=generator).view(trials, k)
    target = p.expand(trials, k + 1, vocab)
    draft_probs = None if q is None else q.expand(trials, k, vocab)
    verdicts = sampling.rejection_sample(target, drafts, draft_probs, torch.rand(trials, k + 1, generator=generator))
    counts = torch.zeros(vocab)
    for row, verdict in enumerate(verdicts):
        for token in drafts[row, : verdict.accepted].tolist() + [verdict.next_token]:
            counts[token] += 1
    return counts


@pytest.mark.parametrize("case", ["random_q", "point_mass_q", "truncated_q", "p_equals_q"])
def test_speculative_sampling_reproduces_the_target_distribution(case):
    generator = torch.Generator().manual_seed(11)
    vocab, k = 8, 3
    p = torch.softmax(torch.randn(vocab, generator=generator) * 1.5, -1)
    q = {
        "random_q": torch.softmax(torch.randn(vocab, generator=generator) * 1.5, -1),
        "point_mass_q": None,
        "truncated_q": sampling.densify(*sampling.truncate_to_support(torch.softmax(torch.randn(1, vocab, generator=generator), -1), 3), vocab)[0],
        "p_equals_q": p.clone(),
    }[case]
    counts = speculative_histogram(p, q, k, trials=20000, seed=12)
    expected = p * counts.sum()
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_the_distribution_test_detects_a_wrong_sampler():
    """Power check: the draft's own distribution (what a sampler that accepted everything would
    emit) fails the same test."""
    generator = torch.Generator().manual_seed(11)
    vocab = 8
    p = torch.softmax(torch.randn(vocab, generator=generator) * 1.5, -1)
    q = torch.softmax(torch.randn(vocab, generator=generator) * 1.5, -1)
    draws = torch.multinomial(q, 80000, replacement=True, generator=generator)
    counts = torch.bincount(draws, minlength=vocab).float()
    assert chisquare(counts.numpy(), (p * counts.sum()).numpy()).pvalue < 1e-6
