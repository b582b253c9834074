"""Draft distillation: the replay of greedy speculation against the real loop, draft vocabularies,
student construction, a distillation step that learns and resumes, and a smoke run of the CLI whose
output draft_service serves."""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill import prompts
from distill.corpus import Example, cut_at_eos
from distill.distill import DistillSettings, Student, collate, distill
from distill.evaluate import simulate_rounds, teacher_forced_correct
from distill.run import main as train_main
from distill.students import StudentSpec, build_student, coverage, draft_vocabulary, parse_students, pca_embedding
from draft_service.drafters.model import DRAFT_VOCAB_FILE, ModelDrafter
from draft_service.server import DraftConfig, build_drafter
from harness.inprocess import in_process_engine, run_generation
from harness.tiny import with_eos
from orchestrator.generation import GenerationRequest
from tests.helpers import distillation_inputs


def test_replay_of_rounds_by_hand():
    every = simulate_rounds([True] * 10, k=4)
    assert (every.tokens, every.rounds, every.accepted) == (10, 2, 8)  # 4 + bonus, then 4 + bonus
    none = simulate_rounds([False] * 3, k=4)
    assert (none.tokens, none.rounds, none.drafted, none.accepted) == (3, 3, 3, 0)  # 2, 1, then 0 drafts left
    mixed = simulate_rounds([True, False, True, True, True, True], k=4)
    # round 1: accepts 1, the target replaces position 1; round 2 drafts min(4, 6 - 2 - 1) = 3, accepts 3, + bonus
    assert (mixed.tokens, mixed.rounds, mixed.drafted, mixed.accepted) == (6, 2, 7, 4)
    assert mixed.summary()["accepted_per_position"] == [1.0, 0.5, 0.5, 0.0]


def test_offline_replay_equals_the_speculation_loop(tiny_target, tokenizer):
    """The evaluation's teacher-forced replay predicts exactly what greedy speculation through the
    real loop measures, here with a draft that is the target restricted to a vocabulary that misses
    one of the tokens the target writes (so some drafts fail) and with a reduced head."""
    target = with_eos(tiny_target, ())
    prompt = "Speculative decoding replays"
    baseline = run_generation(in_process_engine(target), GenerationRequest(prompt=prompt, max_new_tokens=32, num_speculative_tokens=0))
    response = [t for event in baseline for t in event.token_ids]
    counts = Counter(response)
    missing = counts.most_common(2)[-1][0]
    del counts[missing]
    vocabulary = draft_vocabulary(counts, 64, target.vocab_size, always=())
    assert missing not in vocabulary.tolist()

    example = Example("x", "test", prompts.HELD_OUT, "greedy", tokenizer(prompt).input_ids, response)
    replay = simulate_rounds(teacher_forced_correct(target.model, vocabulary, example, "cpu"), k=4)

    draft = replace(target, model=copy.deepcopy(target.model))
    events = run_generation(
        in_process_engine(target, ModelDrafter(draft, head_ids=vocabulary)),
        GenerationRequest(prompt=prompt, max_new_tokens=32, num_speculative_tokens=4),
    )
    stats = events[-1].stats
    assert [t for e in events for t in e.token_ids] == response
    assert 0 < stats.accepted_tokens < stats.draft_tokens
    assert (stats.generated_tokens, stats.rounds, stats.draft_tokens, stats.accepted_tokens) == (
        replay.tokens,
        replay.rounds,
        replay.drafted,
        replay.accepted,
    )


def test_draft_vocabulary_keeps_the_most_frequent_tokens_and_the_forced_ones():
    counts = Counter({5: 10, 7: 8, 9: 1, 3: 4})
    vocabulary = draft_vocabulary(counts, 3, vocab_size=20, always=(2,))
    assert vocabulary.tolist() == [2, 5, 7]
    assert coverage(counts, vocabulary) == pytest.approx(18 / 23)
    assert draft_vocabulary(counts, 0, vocab_size=20, always=(2,)).tolist() == list(range(20))
    assert len(draft_vocabulary(counts, 8, vocab_size=20, always=())) == 8  # padded with unused ids


def test_student_specs():
    assert parse_students("a=6x288/8192,b=2x128+random") == [StudentSpec("a", 6, 288, 8192, True), StudentSpec("b", 2, 128, 0, False)]
    for bad in ("a=6x100", "a=6", "a=6x288,a=2x128", "=2x64"):
        with pytest.raises(ValueError):
            parse_students(bad)


def test_pca_embedding_keeps_the_targets_geometry():
    torch.manual_seed(0)
    table = torch.randn(500, 4) @ torch.randn(4, 64)  # rank 4 embeddings in 64 dimensions
    projected = pca_embedding(table, 8)
    assert projected.shape == (500, 8)
    assert projected.std().item() == pytest.approx(0.02, rel=1e-3)
    distances = torch.cdist(table[:50], table[:50])
    projected_distances = torch.cdist(projected[:50], projected[:50])
    scale = distances.sum() / projected_distances.sum()
    assert torch.allclose(projected_distances * scale, distances, rtol=1e-2, atol=1e-2 * distances.mean().item())


def tiny_llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def test_collate_marks_the_positions_that_predict_response_tokens():
    _, attention, loss_mask = collate([([1, 2, 3, 4, 5], 3), ([6, 7, 8], 1)], pad=0)
    assert attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # row 0: tokens 4 and 5 are the response; they are predicted from positions 2 and 3
    assert loss_mask.tolist() == [[False, False, True, True, False], [True, True, False, False, False]]


def test_distillation_learns_and_resumes_from_its_checkpoint(tmp_path):
    target = tiny_llama(64, seed=1).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    examples = [
        Example(f"e{i}", "test", prompts.TRAIN, "greedy", torch.randint(3, 64, (6,), generator=generator).tolist(),
                torch.randint(3, 64, (20,), generator=generator).tolist())
        for i in range(16)
    ]
    spec = StudentSpec("s", 1, 32, 48)
    vocabulary = draft_vocabulary(Counter(t for e in examples for t in e.response_ids), 48, 64, always=(2,))
    settings = DistillSettings(steps=30, time_budget_s=0, batch_tokens=256, learning_rate=3e-3, warmup_steps=1, max_sequence=64,
                               checkpoint_every_s=3600, seed=0)
    student = Student("s", build_student(spec, target, seed=0), vocabulary)
    state = distill(target, [student], examples, settings, tmp_path / "checkpoint.pt", pad=0, report=lambda *_: None)
    assert state["steps"] == 30
    first, last = student.losses[0], sum(student.losses[-5:]) / 5
    assert last < 0.7 * first

    resumed = Student("s", build_student(spec, target, seed=1), vocabulary)
    longer = replace(settings, steps=40)
    state = distill(target, [resumed], examples, longer, tmp_path / "checkpoint.pt", pad=0, report=lambda *_: None)
    assert state["steps"] == 40 and len(resumed.losses) == 10
    assert resumed.losses[0] < 0.7 * first  # it continued from the trained weights, not from scratch


def test_cut_at_eos_keeps_the_eos():
    assert cut_at_eos([5, 6, 2, 7, 2], (2,)) == [5, 6, 2]
    assert cut_at_eos([5, 6], (2,)) == [5, 6]


def test_training_prompts_never_come_from_specbench(tmp_path):
    with pytest.raises(ValueError):
        prompts.base_prompts(tmp_path / "specbench")
    assert prompts.split_of("gsm8k/1", 0.5) == prompts.split_of("gsm8k/1", 0.5)


def test_cli_smoke_run_makes_a_draft_that_draft_service_serves(tmp_path, tokenizer, tiny_target):
    """The whole command on a tiny target: corpus, two students (reduced and full head),
    distillation, held-out report, model directories; then draft_service loads one and greedy
    speculation with it reproduces target-only output."""
    target_dir, data = distillation_inputs(tmp_path, tiny_target, tokenizer)
    out, work = tmp_path / "drafts", tmp_path / "work"
    train_main([
        "--target", str(target_dir), "--students", "small=1x32/256,full=1x32", "--data-dir", str(data), "--work-dir", str(work),
        "--out-dir", str(out), "--prompts-per-source", "2", "--max-new-tokens", "8", "--steps", "3", "--batch-tokens", "1024",
        "--held-out-fraction", "0.5", "--generation-batch", "4", "--eval-k", "2,4", "--save-dtype", "float32",
    ])
    report = json.loads((work / "report.json").read_text())
    assert set(report["students"]) == {"small", "full"}
    assert report["students"]["small"]["steps"] == 3 and report["corpus"]["held_out"]["examples"] > 0
    assert (out / "small" / DRAFT_VOCAB_FILE).exists() and not (out / "full" / DRAFT_VOCAB_FILE).exists()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "training.json"):
        assert (out / "small" / name).exists()

    drafter, _ = build_drafter(DraftConfig(model=str(out / "small")))
    assert drafter.head_ids is not None and drafter.loaded.model.get_output_embeddings().weight.shape[0] == 256
    assert drafter.vocab_fingerprint == tiny_target.vocab_fingerprint
    target = with_eos(tiny_target, ())
    request = GenerationRequest(prompt="What is 2 plus 2?", max_new_tokens=12, num_speculative_tokens=4)
    speculative = run_generation(in_process_engine(target, drafter), request)
    baseline = run_generation(in_process_engine(target), replace(request, num_speculative_tokens=0))
    assert [t for e in speculative for t in e.token_ids] == [t for e in baseline for t in e.token_ids]
