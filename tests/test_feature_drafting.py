"""Feature drafters: the target's features on the wire, the chain and multi-token drafters, and
their exactness (greedy equality, the sampled distribution, no leak from rolled-back drafts)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from draft_service.drafters import feature_net
from draft_service.drafters.base import DraftSession
from draft_service.drafters.feature import ChainDrafter, MultiTokenDrafter, load_feature_drafter
from draft_service.engine import DraftEngine
from harness.inprocess import in_process_engine
from harness.tiny import tiny_lm, with_eos
from orchestrator.policy import FixedK
from specdec import lm, sampling, wire
from specdec.errors import FailedPrecondition, InvalidArgument
from specdec.messages import Features, ProposeWork, VerifyWork
from target_service.engine import TargetEngine
from tests.test_speculation import assert_target_marginals, greedy, sample_many

LAYERS = {"last": (-1,), "three": (0, 1, -1)}


def make_drafter(target, kind=feature_net.CHAIN, layers=(-1,), vocabulary=None, seed=0, init=1.0):
    """A random feature drafter on `target` (weights scaled by `init` so drafts vary with the input)."""
    torch.manual_seed(seed)
    config = feature_net.FeatureNetConfig.for_target(kind, target.model.config, target.name, layers, num_heads=4 if kind == feature_net.MULTI_TOKEN else 0)
    vocabulary = torch.arange(target.vocab_size) if vocabulary is None else vocabulary
    net = feature_net.build(config, target.model, vocabulary)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(init)
    drafter = {feature_net.CHAIN: ChainDrafter, feature_net.MULTI_TOKEN: MultiTokenDrafter}[kind]
    return drafter(net, target, "feature-test")


def teacher_features(target, ids, layers=(-1,)) -> torch.Tensor:
    """The target's features of ids[:-1] in one pass: [len(ids) - 1, W]."""
    return lm.forward(target.model, [lm.SequenceCache()], [ids[:-1]], logits_for_last=1, features=layers)[1][0]


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("kind", [feature_net.CHAIN, feature_net.MULTI_TOKEN])
def test_greedy_output_with_a_feature_drafter_equals_target_only(tiny_target, kind, k):
    target = with_eos(tiny_target, ())
    baseline, _, _ = greedy(in_process_engine(target), k=0)
    ids, _, last = greedy(in_process_engine(target, make_drafter(target, kind)), k=k)
    assert ids == baseline
    assert last.stats.draft_tokens > 0  # it drafted (all rounds but the first)


def test_a_feature_drafter_with_three_layers_and_a_reduced_vocabulary_stays_exact(tiny_target):
    target = with_eos(tiny_target, ())
    baseline, _, _ = greedy(in_process_engine(target), k=0)
    drafter = make_drafter(target, layers=LAYERS["three"], vocabulary=torch.arange(0, target.vocab_size, 3))
    ids, _, last = greedy(in_process_engine(target, drafter), k=3)
    assert ids == baseline and last.stats.draft_tokens > 0


def test_the_target_returns_features_of_committed_positions_only(tiny_target):
    """Rows of each verdict: every position not returned yet (the prompt's first) up to the last
    committed one, equal to the features of the committed sequence scored afresh: nothing of a
    rejected draft."""
    target = with_eos(tiny_target, ())
    engine = TargetEngine(target)
    prompt = [5, 6, 7, 8, 9]
    engine.start_session("s", prompt, feature_layers=(-1,))
    sequence, committed, got = list(prompt), len(prompt) - 1, []
    for drafts in ([11, 12, 13], [14], []):  # random drafts: mostly rejected
        verdict = engine.verify([VerifyWork("s", committed, sequence[committed:], drafts, None, sampling.GREEDY, [])])[0]
        assert verdict.features.start == (0 if not got else got[-1].end)
        assert verdict.features.end == committed + 1 + verdict.accepted
        got.append(verdict.features)
        sequence += drafts[: verdict.accepted] + [verdict.next_token]
        committed += 1 + verdict.accepted
    rows = Features.joined(got).rows
    torch.testing.assert_close(rows, teacher_features(target, sequence), atol=1e-4, rtol=1e-4)


def test_sessions_without_feature_layers_get_no_features(tiny_target):
    engine = TargetEngine(tiny_target)
    engine.start_session("s", [5, 6, 7])
    assert engine.verify([VerifyWork("s", 2, [7], [8], None, sampling.GREEDY, [])])[0].features is None
    with pytest.raises(InvalidArgument) as error:
        engine.start_session("t", [5, 6, 7], feature_layers=(5,))
    assert error.value.field == "feature_layers"


def test_the_chain_drafters_incremental_drafts_equal_the_training_unroll(tiny_target):
    """Serving (a KV cache, own predictions fed back) and training (`ChainNet.unrolled` with the
    training-time-test mask) compute the same drafts: step j's draft at the round's start n is the
    unroll's step-j argmax at position n - 1 + j, given the drafts as the following tokens."""
    target = with_eos(tiny_target, ())
    drafter = make_drafter(target, layers=LAYERS["three"])
    ids = [5, 9, 17, 33, 2, 8, 40, 41, 7]
    features = teacher_features(target, ids, LAYERS["three"])  # [8, W]
    session = DraftSession(ids=list(ids))
    drafter.start(session)
    drafter.receive(session, Features(0, features.to(torch.bfloat16)))
    k = 4
    drafts = drafter.propose([session], [ProposeWork("s", len(ids), [], k, sampling.GREEDY, [])])[0][0].tokens
    extended = ids + drafts  # the drafts as the tokens after the round's start
    padded = torch.cat([features.to(torch.bfloat16).float(), torch.zeros(k, features.shape[1])])  # rows past n - 1 are never seen
    with torch.no_grad():
        steps = drafter.net.unrolled(padded[: len(extended) - 1], torch.tensor(extended[1:]), k)
    n = len(ids) - 1
    reference = [int(drafter.net.vocabulary[drafter.net.logits(steps[j][n - 1 + j][None]).argmax()]) for j in range(k)]
    assert drafts == reference


def test_features_of_a_rolled_back_draft_never_reach_the_next_round(tiny_target):
    """A session that drafted, was partly rejected and rolled back proposes exactly what a fresh
    session given the same committed sequence and features proposes."""
    target = with_eos(tiny_target, ())
    drafter = make_drafter(target)
    ids = [5, 9, 17, 33, 2, 8]
    long_lived = DraftSession(ids=ids[:4])
    drafter.start(long_lived)
    drafter.receive(long_lived, Features(0, teacher_features(target, ids[:4]).to(torch.bfloat16)))
    drafter.propose([long_lived], [ProposeWork("s", 4, [], 4, sampling.GREEDY, [])])  # 3 own entries enter its cache
    assert long_lived.state.cache.length == 3 + 3
    committed = ids + [12]
    drafter.rollback(long_lived, 4)
    assert long_lived.state.cache.length == 3  # true-feature entries only
    long_lived.ids = list(committed)
    all_features = teacher_features(target, committed).to(torch.bfloat16)
    drafter.receive(long_lived, Features(3, all_features[3:]))
    fresh = DraftSession(ids=list(committed))
    drafter.start(fresh)
    drafter.receive(fresh, Features(0, all_features))
    work = ProposeWork("s", len(committed), [], 4, sampling.GREEDY, [])
    assert drafter.propose([long_lived], [work])[0][0].tokens == drafter.propose([fresh], [work])[0][0].tokens


def test_the_draft_engine_checks_features(tiny_target):
    engine = DraftEngine(make_drafter(tiny_target), max_context=tiny_target.max_context)
    engine.start_session("s", [5, 6, 7, 8])
    rows = teacher_features(tiny_target, [5, 6, 7, 8]).to(torch.bfloat16)
    with pytest.raises(FailedPrecondition) as error:
        engine.propose([ProposeWork("s", 3, [8], 2, sampling.GREEDY, [], Features(1, rows[1:]))])
    assert error.value.field == "items[0].features.start"
    with pytest.raises(InvalidArgument) as error:
        engine.propose([ProposeWork("s", 3, [8], 2, sampling.GREEDY, [], Features(0, rows[:, :8]))])
    assert error.value.field == "items[0].features.width"
    with pytest.raises(InvalidArgument) as error:  # position 3 (token 8) is the one the target has not scored
        engine.propose([ProposeWork("s", 3, [8], 2, sampling.GREEDY, [], Features(0, torch.cat([rows, rows[:1]])))])
    assert error.value.field == "items[0].features.rows"
    short = engine.propose([ProposeWork("s", 3, [8], 2, sampling.GREEDY, [], Features(0, rows[:2]))])[0][0]
    assert short.tokens == []  # short of features: no proposal
    assert len(engine.propose([ProposeWork("s", 3, [8], 2, sampling.GREEDY, [], Features(2, rows[2:]))])[0][0].tokens) == 2


def test_features_survive_the_wire_bit_for_bit():
    rows = torch.randn(5, 12).to(torch.bfloat16)
    back = wire.features_from_proto(wire.features_to_proto(Features(7, rows)), True, "f")
    assert back.start == 7 and torch.equal(back.rows.view(torch.int16), rows.view(torch.int16))
    broken = wire.features_to_proto(Features(7, rows))
    broken.data = broken.data[:-2]
    with pytest.raises(InvalidArgument):
        wire.features_from_proto(broken, True, "items[0].features")


class _Ks(FixedK):
    """K cycling through a list, so rounds of different K alternate (K = 0 included)."""

    def __init__(self, ks):
        super().__init__(max(ks))
        self.ks, self.round = ks, 0

    def next_k(self) -> int:
        self.round += 1
        return self.ks[(self.round - 1) % len(self.ks)]


@pytest.mark.slow  # about 30 s each on 2 cores
@pytest.mark.parametrize("kind", [feature_net.CHAIN, feature_net.MULTI_TOKEN])
def test_sampled_output_with_a_feature_drafter_has_the_targets_distribution(kind):
    """Sampling, warped, K changing round to round (0 included): each of 4 positions' histogram
    over 2000 generations matches the target's exact marginal (chi-square)."""
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.1)
    params = sampling.SamplingParams(0.8, top_k=6, top_p=0.9)
    prompt, steps = [3, 1, 4, 1, 5], 4
    drafter = make_drafter(target, kind, init=0.3)
    counts, stats = asyncio.run(sample_many(target, drafter, prompt, params, 0, steps, trials=2000, make_policy=lambda: _Ks([2, 0, 1, 3])))
    assert stats.accepted_tokens > 50 and stats.draft_tokens - stats.accepted_tokens > 50
    assert_target_marginals(counts, target, prompt, params)


def test_a_saved_feature_drafter_loads_with_only_its_trained_weights(tiny_target, tmp_path):
    drafter = make_drafter(tiny_target, vocabulary=torch.arange(0, tiny_target.vocab_size, 2))
    drafter.net.save(tmp_path / "d", dtype=torch.float32)
    names = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "d" / feature_net.WEIGHTS_FILE)))
    assert "embedding" not in names and "head" not in names and feature_net.VOCAB_KEY in names
    loaded = load_feature_drafter(str(tmp_path / "d"), tiny_target)
    for (name, a), (_, b) in zip(drafter.net.state_dict().items(), loaded.net.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(loaded.net.vocabulary, drafter.net.vocabulary)


def test_the_unroll_from_a_later_row_computes_the_same_chain_there(tiny_target):
    """Training runs unrolled steps only near and after the response; those rows must not change."""
    drafter = make_drafter(tiny_target)
    ids = torch.tensor([5, 9, 17, 33, 2, 8, 40, 41, 7, 3, 11, 12])
    features = teacher_features(tiny_target, ids.tolist())
    with torch.no_grad():
        full = drafter.net.unrolled(features, ids[1:], 4)
        late = drafter.net.unrolled(features, ids[1:], 4, from_row=4)
    torch.testing.assert_close(late[0], full[0])
    for j in range(1, 4):
        torch.testing.assert_close(late[j][j:], full[j][4 + j :], atol=1e-5, rtol=1e-5)


def test_distill_features_command_makes_drafters_that_draft_service_serves(tmp_path, tokenizer, tiny_target):
    """The whole command on a tiny target: feature corpus, both nets trained, resumed from the
    checkpoint, held-out report, directories; then draft_service loads the chain drafter on the
    target's own weights and greedy speculation with it reproduces target-only output."""
    from dataclasses import replace

    from distill.features.corpus import FeatureStore
    from distill.features.run import main as features_main
    from draft_service.server import DraftConfig, build_drafter
    from harness.inprocess import run_generation
    from orchestrator.generation import GenerationRequest
    from tests.helpers import distillation_inputs, joined

    target_dir, data = distillation_inputs(tmp_path, tiny_target, tokenizer)
    work, out = tmp_path / "work", tmp_path / "drafts"
    args = ["--target", str(target_dir), "--data-dir", str(data), "--work-dir", str(work), "--out-dir", str(out),
            "--prompts-per-source", "2", "--max-new-tokens", "8", "--batch-tokens", "16", "--held-out-fraction", "0.3",
            "--draft-vocab", "300", "--mtp-heads", "3", "--unroll", "3", "--train-dtype", "float32"]
    features_main(args + ["--steps", "2"])
    features_main(args + ["--steps", "4"])  # resumes: two more steps
    report = json.loads((work / "report.json").read_text())
    assert report["training"]["steps"] == 4 and set(report["drafters"]) == {"chain", "multi-token"}
    assert report["corpus"]["held_out"]["examples"] > 0 and {"chat", "translation", "context"} <= set(report["corpus"]["train"]["by_source"])
    store = FeatureStore(work / "corpus")
    example = store.examples()[0]
    assert store.features(example).shape == (len(example.ids) - 1, tiny_target.model.config.hidden_size)
    assert (out / "smollm2-feature-chain" / feature_net.WEIGHTS_FILE).exists()

    drafter, _ = build_drafter(DraftConfig(model=str(out / "smollm2-feature-chain"), feature_target=str(target_dir)))
    assert isinstance(drafter, ChainDrafter) and len(drafter.net.vocabulary) == 300
    target = with_eos(tiny_target, ())
    request = GenerationRequest(prompt="What is 2 plus 2?", max_new_tokens=12, num_speculative_tokens=4)
    speculative = run_generation(in_process_engine(target, drafter), request)
    baseline = run_generation(in_process_engine(target), replace(request, num_speculative_tokens=0))
    assert joined(speculative) == joined(baseline) and speculative[-1].stats.draft_tokens > 0


@pytest.mark.parametrize("format", ["float32", "q4_1"])
def test_a_corpus_holds_the_features_its_format_computes(tmp_path, tiny_target, format):
    """Written while generating (prompts of several lengths decoded together, so prefills and
    steps share passes), each example's features are those of its whole sequence scored afresh in
    the same format: bit for bit in the native one, whose rows do not depend on each other."""
    from distill.features.corpus import FeatureStore, generate
    from distill.prompts import TRAIN, Prompt

    path = lm.path_for(tiny_target.model, format)
    encoded = [(Prompt(f"p{i}", "instructions", f"prompt {i}", TRAIN), [(5 * i + j) % 200 + 3 for j in range(4 + 3 * i)]) for i in range(5)]
    store = FeatureStore(tmp_path / "corpus")
    assert generate(path, encoded, store, eos_ids=(), layers=(-1,), batch_size=3, max_new_tokens=6) == 5
    for example in store.examples():
        _, (fresh,) = path.forward([lm.SequenceCache()], [example.ids[:-1]], logits_for_last=1, features=(-1,))
        stored = store.features(example)
        assert stored.dtype == torch.bfloat16
        if format == "q4_1":
            assert torch.equal(stored, fresh.to(torch.bfloat16))
        else:
            torch.testing.assert_close(stored.float(), fresh, atol=2e-2, rtol=1e-2)


def test_features_travel_through_the_orchestrator_across_the_network(tiny_target):
    """Real gRPC servers: greedy output with a chain drafter equals target-only, the features
    cross both hops (the bytes per round grow by about (accepted + 1) x hidden x 2), the
    services' own protocol checks apply, and no session is left behind."""
    from harness.inprocess import start_stack
    from harness.probes import wait_for_sessions
    from specdec.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, target_pb2, target_pb2_grpc

    target = with_eos(tiny_target, ())
    stack = start_stack(target, make_drafter(target))
    try:
        with stack.channel("orchestrator") as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            ask = lambda k: orchestrator_pb2.GenerateRequest(prompt="Once upon a time", max_new_tokens=24, num_speculative_tokens=k)  # noqa: E731
            baseline, speculative = stub.Generate(ask(0), timeout=60), stub.Generate(ask(3), timeout=60)
        assert list(speculative.token_ids) == list(baseline.token_ids)
        stats = speculative.stats
        assert stats.draft_tokens > 0
        hidden = target.model.config.hidden_size
        assert stats.bytes_per_round > 2 * hidden * 2  # at least one feature row per hop and round
        with stack.channel("target") as channel:
            target_stub = target_pb2_grpc.TargetServiceStub(channel)
            with pytest.raises(Exception) as error:
                target_stub.StartSession(common_pb2.StartSessionRequest(session_id="x", prompt_token_ids=[1, 2], feature_layers=[7]), timeout=10)
            assert error.value.code().name == "INVALID_ARGUMENT" and "feature_layers" in error.value.details()
            target_stub.StartSession(common_pb2.StartSessionRequest(session_id="y", prompt_token_ids=[1, 2, 3], feature_layers=[-1]), timeout=10)
            item = target_pb2.VerifyItem(session_id="y", prefix_len=2, tokens=[3], draft_tokens=[4], sampling=common_pb2.SamplingParams(top_p=1.0))
            result = target_stub.Verify(target_pb2.VerifyRequest(items=[item]), timeout=10).results[0]
            assert result.features.start == 0 and result.features.rows == 3 + result.accepted and result.features.width == hidden
            assert len(result.features.data) == 2 * result.features.rows * hidden
            target_stub.EndSession(common_pb2.EndSessionRequest(session_id="y"), timeout=10)
        assert wait_for_sessions(stack, 0) == (0, 0)
    finally:
        stack.stop()
