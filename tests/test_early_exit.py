"""Early exit (draft_service/drafters/early_exit.py, distill/early_exit.py): the target's first L
layers and a trained exit layer, assembled into an ordinary draft model. The assembled draft
computes what the target's first L layers and the exit compute; the training command trains,
resumes and writes exits that draft_service serves; speculation with an exit stays exact (greedy
equality, the chi-square distribution test)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest
import torch

from draft_service.drafters import early_exit
from draft_service.drafters.early_exit import ExitConfig, ExitNet
from draft_service.drafters.model import ModelDrafter
from draft_service.server import DraftConfig, build_drafter
from harness.inprocess import in_process_engine, run_generation
from harness.tiny import tiny_lm, with_eos
from orchestrator.generation import GenerationRequest
from specdec import lm, sampling
from specdec.models import load_causal_lm
from tests.helpers import distillation_inputs, joined
from tests.test_speculation import assert_target_marginals, sample_many


def saved_exit(tmp_path, loaded, layers: int, vocabulary: torch.Tensor, scale: float = 1.0):
    """An exit after `layers` layers of `loaded` (initialized from its next layer, the MLP scaled:
    not the target's own layer), saved; returns its directory and the net."""
    net = ExitNet.initialized(ExitConfig("unused", layers), loaded.model, vocabulary)
    net.body.layers[0].mlp.down_proj.weight.data.mul_(scale)
    directory = tmp_path / f"exit-l{layers}"
    net.save(directory, dtype=torch.float32)
    return directory, net


def test_the_assembled_draft_computes_the_first_layers_and_the_exit(tmp_path):
    target = tiny_lm(seed=3, vocab_size=40, eos=(), hidden=64)
    target.model.model.layers.append(tiny_lm(seed=4, vocab_size=40, eos=(), hidden=64).model.model.layers[0])  # 3 layers
    target.model.config.num_hidden_layers = 3
    vocabulary = torch.tensor([0, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37])
    directory, net = saved_exit(tmp_path, target, 2, vocabulary, scale=1.7)
    ids = torch.tensor([[1, 4, 9, 16, 25, 36, 9, 4]])
    with torch.inference_mode():
        hidden = target.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]  # after layer 2 (index 1)
        expected = net(hidden)  # [T, V']
    copy = tiny_lm(seed=3, vocab_size=40, eos=(), hidden=64)
    copy.model.model.layers.append(tiny_lm(seed=4, vocab_size=40, eos=(), hidden=64).model.model.layers[0])
    copy.model.config.num_hidden_layers = 3
    assembled, head_ids = early_exit.assemble(directory, copy, "float32")
    assert len(assembled.model.model.layers) == 3 and torch.equal(head_ids, vocabulary)
    drafter = ModelDrafter(assembled, head_ids=head_ids)
    logits = lm.forward(drafter.loaded.model, [lm.SequenceCache()], [ids[0].tolist()])[0]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_exit_specs_are_resolved_and_checked(tmp_path):
    assert early_exit.directory_of("ngram") is None and early_exit.directory_of("smollm2-draft-l6") is None
    with pytest.raises(ValueError, match="early-exit:L"):
        early_exit.directory_of("early-exit:x")
    with pytest.raises(ValueError, match="no early exit after 99 layers"):
        early_exit.directory_of("early-exit:99")
    target = tiny_lm(seed=3, vocab_size=40, eos=())
    directory, _ = saved_exit(tmp_path, target, 1, torch.arange(40))
    assert early_exit.directory_of(str(directory)) == directory
    (directory / early_exit.CONFIG_FILE).write_text(json.dumps({"target": "unused", "layers": 2}))
    with pytest.raises(ValueError, match="needs a target with more than 2"):
        early_exit.assemble(directory, tiny_lm(seed=3, vocab_size=40, eos=()), "float32")


def test_distill_early_exit_command_trains_exits_that_draft_service_serves(tmp_path, tokenizer, tiny_target):
    """The corpus (distill.features, recording layer 0 and the last), then the exit after one
    layer trained, resumed from its checkpoint, reported and saved; draft_service loads it on the
    target's own weights, and greedy speculation with it reproduces target-only output."""
    from distill.early_exit import main as exits_main
    from distill.features.run import main as features_main

    target_dir, data = distillation_inputs(tmp_path, tiny_target, tokenizer)
    work, out = tmp_path / "work", tmp_path / "drafts"
    features_main(["--target", str(target_dir), "--data-dir", str(data), "--work-dir", str(work), "--prompts-per-source", "2",
                   "--max-new-tokens", "8", "--held-out-fraction", "0.3", "--feature-layers", "0,-1", "--stop-after", "corpus"])
    args = ["--target", str(target_dir), "--work-dir", str(work), "--out-dir", str(out), "--feature-layers", "0,-1", "--exits", "1",
            "--batch-tokens", "16", "--draft-vocab", "300", "--train-dtype", "float32", "--skip-costs", "--eval-k", "1,4"]
    exits_main(args + ["--steps", "2"])
    exits_main(args + ["--steps", "4"])  # resumes: two more steps
    report = json.loads((work / "exits-report.json").read_text())
    assert report["training"]["steps"] == 4 and report["held_out_tokens"] > 0
    facts = report["exits"]["1"]
    assert set(facts["acceptance"]) == {"k1", "k4"} and 0 <= facts["trained_top1"] <= 1
    assert facts["trained_parameters"] == sum(p.numel() for p in tiny_target.model.model.layers[1].parameters()) + tiny_target.model.config.hidden_size

    drafter, _ = build_drafter(DraftConfig(model=str(out / "smollm2-exit-l1"), feature_target=str(target_dir), dtype="float32"))
    assert isinstance(drafter, ModelDrafter) and len(drafter.head_ids) == 300 and len(drafter.loaded.model.model.layers) == 2
    target = with_eos(tiny_target, ())
    request = GenerationRequest(prompt="What is 2 plus 2?", max_new_tokens=12, num_speculative_tokens=4)
    speculative = run_generation(in_process_engine(target, drafter), request)
    baseline = run_generation(in_process_engine(target), replace(request, num_speculative_tokens=0))
    assert joined(speculative) == joined(baseline) and speculative[-1].stats.draft_tokens > 0


@pytest.mark.slow  # about 30 s each
@pytest.mark.parametrize("params", [sampling.SamplingParams(1.0), sampling.SamplingParams(0.8, top_k=6, top_p=0.9)], ids=["plain", "warped"])
def test_early_exit_sampling_keeps_the_targets_distribution(tmp_path, params):
    """Chi-square of 2,000 sampled generations against the target's exact marginals, drafted by
    an exit after the target's first layer (reduced vocabulary: q has less support than p)."""
    target = tiny_lm(seed=21, vocab_size=16, eos=(), init=0.6)
    directory, _ = saved_exit(tmp_path, target, 1, torch.tensor([0, 1, 2, 3, 4, 5, 8, 9, 12, 15]), scale=0.5)
    assembled, head_ids = early_exit.assemble(directory, tiny_lm(seed=21, vocab_size=16, eos=(), init=0.6), "float32")
    prompt = [3, 1, 4, 1, 5]
    counts, stats = asyncio.run(sample_many(target, ModelDrafter(assembled, head_ids=head_ids), prompt, params, 3, 4, trials=2000))
    assert stats.accepted_tokens > 0
    assert_target_marginals(counts, target, prompt, params)


def test_an_exit_borrows_the_target_it_names(tmp_path, tiny_target, tokenizer):
    """draft_service reads the exit's target from its configuration when --feature-target is empty."""
    target_dir = tmp_path / "target"
    tiny_target.model.save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)
    loaded = load_causal_lm(str(target_dir))
    net = ExitNet.initialized(ExitConfig(str(target_dir), 1), loaded.model, torch.arange(200))
    net.save(tmp_path / "exit")
    drafter, context = build_drafter(DraftConfig(model=str(tmp_path / "exit"), dtype="float32"))
    assert drafter.loaded.tokenizer is not None and context == loaded.max_context and len(drafter.loaded.model.model.layers) == 2
