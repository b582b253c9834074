"""Choosing the draft tree (orchestrator/tree_policy.py): every shape is tried first; then, where
the verify cost is flat, the tree that commits the most tokens per round wins, and where it grows
with the tokens scored, the chain does; the runner-up is retried now and then; K = 0 drafts
nothing. Timings are given, not measured."""

from __future__ import annotations

from dataclasses import replace

from draft_service.drafters.model import ModelDrafter
from harness.inprocess import in_process_engine, run_generation
from orchestrator.generation import GenerationRequest
from orchestrator.policy import CostCurve, LoadEstimates
from orchestrator.tree_policy import EXPLORE_ROUNDS, LADDER, REEXPLORE_EVERY, FixedTree, TreeChooser, tree_choice
from specdec.trees import TreeShape
from tests.helpers import joined

FLAT = ((1, 0.010), (16, 0.0105), (32, 0.011), (64, 0.012))  # a GPU, or bf16 with AMX
STEEP = ((1, 0.012), (16, 0.068), (32, 0.137), (64, 0.274))  # q4_1 on this AVX2 CPU (bench.trees)
TOKENS = {7: 1.7, 15: 1.9, 31: 2.3}  # tokens per round of each ladder tree (by its nodes)
CHAIN_TOKENS = 1.4  # at K = 4 (1.38 measured with the l6 draft, bench.trees)


def run(curve, rounds: int, k: int = 4, draft_step_s: float = 0.0002) -> tuple[TreeChooser, list]:
    chooser = TreeChooser(LoadEstimates(CostCurve(curve)), max_nodes=32)
    chosen = []
    for _ in range(rounds):
        depth, shape = chooser.choose(k)
        chosen.append(shape)
        committed = CHAIN_TOKENS if shape is None else TOKENS[shape.max_nodes]
        chooser.observe(shape, committed, draft_step_s * (depth if shape is None else depth + 1))
    return chooser, chosen


def test_every_tree_is_tried_first_then_a_flat_verify_takes_the_widest_that_pays():
    _, chosen = run(FLAT, 3 * EXPLORE_ROUNDS + 40)
    assert chosen[: 3 * EXPLORE_ROUNDS] == [shape for _, shape in LADDER for _ in range(EXPLORE_ROUNDS)]
    settled = chosen[3 * EXPLORE_ROUNDS :]  # the chain's first rounds are its own exploration
    assert settled[-30:].count(TreeShape((8, 4), 31)) >= 29


def test_a_verify_that_grows_with_its_tokens_keeps_the_chain():
    chooser, chosen = run(STEEP, 3 * EXPLORE_ROUNDS + 40, draft_step_s=0.002)
    assert chosen[3 * EXPLORE_ROUNDS :].count(None) >= 39
    assert chooser.chain_throughput(4) > max(chooser.tree_throughput(d, s) for d, s in LADDER)


def test_the_runner_up_gets_a_round_now_and_then():
    _, chosen = run(FLAT, REEXPLORE_EVERY * 3)
    settled = chosen[3 * EXPLORE_ROUNDS :]
    assert 2 <= sum(shape != TreeShape((8, 4), 31) for shape in settled) <= 4


def test_no_drafting_means_no_tree_and_a_fixed_shape_stays():
    chooser = TreeChooser(LoadEstimates(CostCurve(FLAT)), max_nodes=16)
    assert chooser.choose(0) == (0, None)
    assert [s.max_nodes for _, s in chooser.candidates] == [7, 15]  # 31 nodes exceed the target's limit
    assert tree_choice("3,2,1", chooser.load, 16).choose(3) == (3, TreeShape((3, 2, 1)))
    assert isinstance(tree_choice("4/15", chooser.load, 16), FixedTree) and tree_choice("", chooser.load, 16) is None


def test_auto_trees_through_the_loop_keep_the_greedy_output(tiny_target, tiny_draft):
    request = GenerationRequest(prompt="the cat sat on the mat and the cat sat on the", max_new_tokens=40, num_speculative_tokens=4)
    reference = joined(run_generation(in_process_engine(tiny_target, ModelDrafter(tiny_draft)), replace(request, num_speculative_tokens=0)))
    engine = in_process_engine(tiny_target, ModelDrafter(tiny_draft), draft_tree="auto")
    engine.load.curve = CostCurve(FLAT)  # the in-process target measured none; the chooser shares these estimates
    assert joined(run_generation(engine, request)) == reference
    assert sum(seen.tries for shape, seen in engine.trees.observed.items() if shape is not None) > 0
