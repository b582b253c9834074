"""Tree acceptance (specdec/trees.py): the tensor path equals the definition on random trees,
greedy is the point-mass case, a chain is verified as the chain sampler verifies it, and the
tokens that come out are distributed exactly as the target's (chi-square on the joint of two
tokens, several tree shapes and draft distributions), while a wrong rule fails the same test."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare

from draft_service.drafters import ngram
from draft_service.drafters.model import ModelDrafter
from draft_service.drafters.ngram import NGramDrafter
from draft_service.engine import DraftEngine
from harness.inprocess import in_process_engine, run_generation
from harness.tiny import tiny_lm
from orchestrator.generation import GenerationRequest
from specdec.errors import InvalidArgument
from specdec.messages import ProposeWork, VerifyWork
from specdec.trees import TreeShape
from target_service.engine import TargetEngine
from tests.helpers import joined
from tests.test_speculation import assert_target_marginals, sample_many
from specdec import lm, sampling, trees, weights
from specdec.sampling import GREEDY

VOCAB = 6


def without_replacement(q: torch.Tensor, m: int, generator: torch.Generator) -> list[int]:
    """m distinct tokens drawn from q without replacement (Gumbel top-m)."""
    gumbel = -torch.log(-torch.log(torch.rand(q.shape[-1], generator=generator).clamp(min=1e-12)))
    return torch.topk(q.log() + gumbel, m).indices.tolist()


def random_tree(generator: torch.Generator, nodes: int) -> list[int]:
    parents = []
    for index in range(nodes):
        parents.append(int(torch.randint(-1, index, (1,), generator=generator)))
    return parents


def random_tree_case(generator, nodes: int, point_mass: bool, sparse: bool, equal: bool):
    """p for the root and every node, a tree whose siblings are distinct draws from their parent's
    q (without replacement), that q per node (None: point masses), and n + 1 uniforms."""
    parents = random_tree(generator, nodes)
    p = torch.softmax(torch.randn(nodes + 1, VOCAB, generator=generator) * 2, -1)
    if sparse:
        p = p * (torch.rand(nodes + 1, VOCAB, generator=generator) > 0.4)
        p[:, 0] += 1e-3
        p = p / p.sum(-1, keepdim=True)
    q_at = p.clone() if equal else torch.softmax(torch.randn(nodes + 1, VOCAB, generator=generator) * 2, -1)  # q at each node's row
    tokens = [0] * nodes
    for node in [-1, *range(nodes)]:
        kids = trees.children(parents, node)
        support = int((q_at[node + 1] > 0).sum())
        drawn = without_replacement(q_at[node + 1], min(len(kids), support), generator)
        kids = kids[: len(drawn)]
        for kid, token in zip(kids, drawn):
            tokens[kid] = token
    # a node whose draw ran out of support stays token 0 under its parent: repair by dropping duplicates
    if trees.check_parents(parents, tokens) is not None:
        return random_tree_case(generator, nodes, point_mass, sparse, equal)
    q = None if point_mass else torch.stack([q_at[parent + 1] for parent in parents]) if nodes else torch.zeros(0, VOCAB)
    return p, tokens, parents, q, torch.rand(nodes + 1, generator=generator)


@pytest.mark.parametrize("point_mass", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("equal", [False, True])
def test_fast_tree_acceptance_matches_the_definition(point_mass, sparse, equal):
    generator = torch.Generator().manual_seed(hash((point_mass, sparse, equal)) % 2**31)
    for _ in range(150):
        nodes = int(torch.randint(0, 10, (1,), generator=generator))
        p, tokens, parents, q, uniforms = random_tree_case(generator, nodes, point_mass, sparse, equal)
        fast = trees.tree_rejection_sample(p, tokens, parents, q, uniforms)
        slow = trees.reference_tree_rejection_sample(p, tokens, parents, q, uniforms.tolist())
        assert fast == slow
        assert all(parents[b] == a for a, b in zip((-1, *fast.path), fast.path))  # a path from the root


def test_greedy_tree_verify_is_the_point_mass_case():
    generator = torch.Generator().manual_seed(5)
    for _ in range(300):
        nodes = int(torch.randint(0, 10, (1,), generator=generator))
        logits = torch.randn(nodes + 1, VOCAB, generator=generator)
        _, tokens, parents, _, uniforms = random_tree_case(generator, nodes, True, False, False)
        greedy = trees.greedy_tree_verify(logits, tokens, parents)
        assert greedy == trees.tree_rejection_sample(sampling.warp(logits, GREEDY), tokens, parents, None, uniforms)


@pytest.mark.parametrize("point_mass", [False, True])
def test_a_chain_is_verified_as_the_chain_sampler_does(point_mass):
    generator = torch.Generator().manual_seed(6)
    for _ in range(200):
        k = int(torch.randint(0, 6, (1,), generator=generator))
        p = torch.softmax(torch.randn(k + 1, VOCAB, generator=generator) * 2, -1)
        q = torch.softmax(torch.randn(k, VOCAB, generator=generator) * 2, -1)
        drafts = torch.multinomial(q, 1, generator=generator).squeeze(1) if k else torch.zeros(0, dtype=torch.long)
        uniforms = torch.rand(k + 1, generator=generator)
        q = None if point_mass else q
        chain = sampling.rejection_sample(p[None], drafts[None], None if q is None else q[None], uniforms[None])[0]
        tree = trees.tree_rejection_sample(p, drafts.tolist(), trees.chain(k), q, uniforms)
        assert (len(tree.path), tree.next_token) == (chain.accepted, chain.next_token) and tree.path == tuple(range(chain.accepted))


def test_malformed_trees_are_named():
    assert trees.check_parents([-1, 0, 0], [1, 2, 3]) is None
    assert "earlier node" in trees.check_parents([-1, 2, 0], [1, 2, 3])
    assert "twice" in trees.check_parents([-1, -1], [4, 4])
    assert "entries" in trees.check_parents([-1], [1, 2])


# --- the distribution: two tokens out of rounds over a toy model whose next token depends on the last


def two_tokens(target: torch.Tensor, draft: torch.Tensor, branching: list[int], mode: str, trials: int, seed: int) -> torch.Tensor:
    """Counts [V, V] of the first two output tokens over `trials` generations, each a loop of tree
    rounds (`branching` children per node per depth) from the start token VOCAB. target/draft:
    [V + 1, V] distributions of the next token given the last one. `mode`: "sampled" (siblings
    drawn from q without replacement, q sent), "top" (the draft's top-k, point masses), or
    "top-claimed-sampled" (top-k, but q sent as if sampled: a wrong use of the rule)."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB, VOCAB)
    for _ in range(trials):
        out, last = [], VOCAB
        while len(out) < 2:
            tokens, parents, rows, frontier = [], [], [], [(-1, last)]
            for width in branching:
                next_frontier = []
                for node, token in frontier:
                    if mode == "sampled":
                        kids = without_replacement(draft[token], width, generator)
                    else:
                        kids = torch.topk(draft[token], width).indices.tolist()
                    for kid in kids:
                        tokens.append(kid)
                        parents.append(node)
                        rows.append(draft[token])
                        next_frontier.append((len(tokens) - 1, kid))
                frontier = next_frontier
            p = torch.stack([target[last]] + [target[t] for t in tokens])
            q = None if mode == "top" else torch.stack(rows)
            verdict = trees.tree_rejection_sample(p, tokens, parents, q, torch.rand(len(tokens) + 1, generator=generator))
            out += [tokens[i] for i in verdict.path] + [verdict.next_token]
            last = out[-1]
        counts[out[0], out[1]] += 1
    return counts


def toy_model(seed: int, sharpness: float) -> torch.Tensor:
    return torch.softmax(torch.randn(VOCAB + 1, VOCAB, generator=torch.Generator().manual_seed(seed)) * sharpness, -1)


@pytest.mark.parametrize(
    "mode, branching, draft",
    [("sampled", [3, 2], "random"), ("sampled", [2, 2, 1], "peaked"), ("sampled", [3, 1], "equal"), ("top", [3, 2], "random"), ("top", [2, 2], "peaked")],
)
def test_tree_speculation_reproduces_the_target_distribution(mode, branching, draft):
    target = toy_model(1, 1.5)
    q = {"random": toy_model(2, 1.5), "peaked": toy_model(3, 4.0), "equal": target.clone()}[draft]
    counts = two_tokens(target, q, branching, mode, trials=6000, seed=7)
    expected = target[VOCAB][:, None] * target[:VOCAB]  # p(a) p(b | a)
    assert chisquare(counts.flatten().numpy(), (expected.flatten() * counts.sum()).numpy()).pvalue > 1e-3


def test_the_tree_distribution_test_detects_a_wrong_rule():
    """Power check: deterministic top-k children verified as if they had been sampled from q."""
    target, q = toy_model(1, 1.5), toy_model(3, 4.0)
    counts = two_tokens(target, q, [3, 2], "top-claimed-sampled", trials=6000, seed=7)
    expected = target[VOCAB][:, None] * target[:VOCAB]
    assert chisquare(counts.flatten().numpy(), (expected.flatten() * counts.sum()).numpy()).pvalue < 1e-6


# --- the tree forward pass: every node's logits are its path's, as a chain would score them


def tree_and_prefix(vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, vocab, (23,), generator=generator).tolist()
    # pending token 0, then a tree under it: two children, each with children, one deeper branch
    parents = [-1, 0, 0, 1, 1, 2, 3, 5, 0]
    tokens = torch.randint(0, vocab, (len(parents),), generator=generator).tolist()
    return prefix, tokens, parents


def prefilled(model, prefix):
    cache = lm.SequenceCache()
    lm.forward(model, [cache], [prefix], logits_for_last=1)
    return cache


def chain_logits(model, prefix, tokens, parents, run=lm.forward):
    """Each node's logits from its path fed as a chain after the prefix."""
    rows = []
    for node in range(len(tokens)):
        cache = prefilled(model, prefix)
        path = trees.path_to(parents, node)
        rows.append(run(model, [cache], [[tokens[i] for i in path]])[0][-1])
    return torch.stack(rows)


@pytest.mark.parametrize("format", ["float32", "bfloat16", "int8", "int4", *weights.NATIVE_FORMATS])
def test_a_tree_pass_gives_each_node_its_paths_logits_bit_for_bit(tokenizer, format):
    loaded = tiny_lm(seed=1, vocab_size=len(tokenizer), hidden=64)
    lm.use_format(loaded.model, format)
    prefix, tokens, parents = tree_and_prefix(loaded.vocab_size, 2)
    cache = prefilled(loaded.model, prefix)
    other = prefilled(loaded.model, prefix[:9])  # a chain row beside the tree in the same pass
    tree_rows, chain_rows = lm.forward(loaded.model, [cache, other], [tokens, prefix[9:12]], parents=[parents, None])
    # float32 products are not batch-invariant (a row's result depends on how many rows the pass
    # multiplies): equal to rounding there, bit for bit in the other formats
    same = (lambda a, b: torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)) if format == "float32" else assert_equal
    same(tree_rows, chain_logits(loaded.model, prefix, tokens, parents))
    same(chain_rows, lm.forward(loaded.model, [prefilled(loaded.model, prefix[:9])], [prefix[9:12]])[0])
    # keep the path 0 -> 2 -> 5 -> 7; the next token then sees exactly that path
    assert cache.length == len(prefix) + len(tokens)
    cache.keep_path(len(prefix), [0, 2, 5, 7])
    after = lm.forward(loaded.model, [cache], [[11]])[0]
    fresh = prefilled(loaded.model, prefix)
    same(after, lm.forward(loaded.model, [fresh], [[tokens[i] for i in (0, 2, 5, 7)] + [11]])[0][-1:])


def assert_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b), (a - b).abs().max()


def test_the_transformers_path_scores_a_tree_with_a_mask(tokenizer):
    loaded = tiny_lm(seed=1, vocab_size=len(tokenizer), hidden=64)
    prefix, tokens, parents = tree_and_prefix(loaded.vocab_size, 3)
    cache = prefilled(loaded.model, prefix)
    rows = lm.forward_transformers(loaded.model, cache, tokens, None, "cpu", parents)
    expected = chain_logits(loaded.model, prefix, tokens, parents)
    torch.testing.assert_close(rows, expected, atol=1e-4, rtol=1e-4)
    cache.keep_path(len(prefix), [0, 1, 4])
    after = lm.forward_transformers(loaded.model, cache, [11], None, "cpu")
    torch.testing.assert_close(after, lm.forward(loaded.model, [prefilled(loaded.model, prefix)], [[tokens[i] for i in (0, 1, 4)] + [11]])[0][-1:],
                               atol=1e-4, rtol=1e-4)


def test_a_tree_through_another_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).eval()
    prefix, tokens, parents = tree_and_prefix(64, 4)
    rows = lm.forward(model, [prefilled(model, prefix)], [tokens], parents=[parents])[0]
    torch.testing.assert_close(rows, chain_logits(model, prefix, tokens, parents), atol=1e-4, rtol=1e-4)


# --- trees through the whole loop: drafters grow them, the target verifies them, the output is the target's


def test_drafters_grow_static_and_dynamic_trees(tiny_target, tiny_draft):
    session_ids = list(range(1, 40))
    engine = DraftEngine(ModelDrafter(tiny_draft), max_context=512)
    engine.start_session("s", session_ids)
    static = engine.propose([ProposeWork("s", len(session_ids) - 1, session_ids[-1:], 3, GREEDY, [], tree=TreeShape((3, 2)))])[0][0]
    assert len(static.tokens) == 3 + 6 + 12 and trees.depths(static.parents) == [1] * 3 + [2] * 6 + [3] * 12
    assert trees.check_parents(static.parents, static.tokens) is None
    dynamic = engine.propose([ProposeWork("s", len(session_ids) - 1, session_ids[-1:], 4, GREEDY, [], tree=TreeShape((3, 2), 7))])[0][0]
    assert len(dynamic.tokens) == 7 and trees.check_parents(dynamic.parents, dynamic.tokens) is None
    # the first child of each node is the draft's greedy choice: the tree's first path is the greedy chain
    chain = engine.propose([ProposeWork("s", len(session_ids) - 1, session_ids[-1:], 3, GREEDY, [])])[0][0]
    assert [static.tokens[i] for i in (0, 3, 9)] == chain.tokens
    # n-grams: every earlier continuation of the last token, merged
    assert ngram.continuations([5, 6, 7, 5, 6, 8, 5, 9, 5], 3, 16) == ([6, 7, 5, 8, 5, 9, 5], [-1, 0, 1, 0, 3, -1, 5])
    assert ngram.continuations([5, 6, 7, 5, 6, 8, 5, 9, 5], 3, 4) == ([6, 7, 5, 8], [-1, 0, 1, 0])


@pytest.mark.parametrize("shape", ["3,2", "2,2,1/5"])
@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_greedy_tree_speculation_equals_target_only(tiny_target, tiny_draft, shape, drafter):
    make = (lambda: ModelDrafter(tiny_draft)) if drafter == "model" else NGramDrafter
    request = GenerationRequest(prompt="the cat sat on the mat and the cat sat on the", max_new_tokens=40, num_speculative_tokens=3)
    reference = joined(run_generation(in_process_engine(tiny_target, make()), replace(request, num_speculative_tokens=0)))
    events = run_generation(in_process_engine(tiny_target, make(), draft_tree=shape), request)
    assert joined(events) == reference and events[-1].stats.draft_tokens > 0


@pytest.mark.parametrize("case", ["plain", "warped", "penalized", "seed_stable"])
def test_sampled_tree_speculation_keeps_the_targets_distribution(case):
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.1)
    draft = tiny_lm(seed=22, vocab_size=16, eos=(), init=0.1)
    params = {
        "plain": sampling.SamplingParams(1.0),
        "warped": sampling.SamplingParams(0.8, top_k=6, top_p=0.9),
        "penalized": sampling.SamplingParams(1.0, repetition_penalty=1.6, presence_penalty=0.5),
        "seed_stable": sampling.SamplingParams(1.0),
    }[case]
    prompt, steps = [3, 1, 4, 1, 5], 3
    counts, stats = asyncio.run(sample_many(target, ModelDrafter(draft), prompt, params, 2, steps, trials=2000,
                                            seed_stable=case == "seed_stable", tree=TreeShape((3, 2), 6 if case == "warped" else 0)))
    assert stats.accepted_tokens > 50 and stats.draft_tokens - stats.accepted_tokens > 50
    assert_target_marginals(counts, target, prompt, params)


def test_malformed_tree_work_is_refused_naming_the_field(tiny_target, tiny_draft):
    target = TargetEngine(tiny_target)
    target.start_session("s", [1, 2, 3])
    bad = VerifyWork("s", 2, [3], [5, 6], None, GREEDY, [], draft_parents=[-1, 1])
    with pytest.raises(InvalidArgument) as refused:
        target.verify([bad])
    assert refused.value.field == "items[0].draft_parents" and "earlier node" in str(refused.value)
    # the session is intact: a good tree goes through and keeps only the accepted path
    verdict = target.verify([replace(bad, draft_parents=[-1, -1])])[0]
    assert target.sessions.get("s").cache.length == 3 + verdict.accepted == len(target.sessions.get("s").ids)
    drafts = DraftEngine(ModelDrafter(tiny_draft), max_context=512)
    drafts.start_session("s", [1, 2, 3])
    for shape, message in ((TreeShape((0,)), "at least 1"), (TreeShape((8, 8)), "at most 64")):
        with pytest.raises(InvalidArgument) as refused:
            drafts.propose([ProposeWork("s", 2, [3], 3, GREEDY, [], tree=shape)])
        assert refused.value.field == "items[0].tree_branching" and message in str(refused.value)


def test_a_tree_and_a_chain_verified_in_one_pass_get_what_each_gets_alone(tiny_target):
    prompt = [5, 9, 2, 7, 7, 3]
    tree = VerifyWork("a", 5, [3], [4, 8, 6, 1], None, GREEDY, [], draft_parents=[-1, -1, 0, 2])
    chain = VerifyWork("b", 5, [3], [4, 6], None, GREEDY, [])
    alone = []
    for work in (tree, chain):
        engine = TargetEngine(tiny_target)
        engine.start_session(work.session_id, prompt)
        alone.append((engine.verify([work])[0], engine.sessions.get(work.session_id).ids))
    together = TargetEngine(tiny_target)
    for work in (tree, chain):
        together.start_session(work.session_id, prompt)
    verdicts = together.verify([tree, chain])
    assert [(v, together.sessions.get(w.session_id).ids) for v, w in zip(verdicts, (tree, chain))] == alone


@pytest.mark.slow  # the embedded target
def test_the_tree_benchmark_runs_and_reports(tmp_path):
    from bench import trees as bench_trees

    out = tmp_path / "trees.json"
    assert bench_trees.main(["--limit", "1", "--drafter", "ngram", "--variants", "0;1;4:8,4/7", "--max-new-tokens", "8", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["identical_to_first"] == {"target only": 1, "chain K=4": 1, "K=4 8,4/7": 1} and summary["chain_reference"] == "chain K=4"
    assert set(summary["variants"]) == {"target only", "chain K=4", "K=4 8,4/7"} and summary["verify_ms"]["16"] > 0
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 1 and out.with_suffix(".png").exists()
