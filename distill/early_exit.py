"""`python -m distill.early_exit`: exits after several target layers L, distilled from the target.

Input: a feature corpus (`python -m distill.features --stop-after corpus --feature-layers ...`)
that recorded the target's hidden states after layer L - 1 for every L wanted, and its last layer
(the labels). Each exit (`draft_service.drafters.early_exit.ExitNet`: one decoder layer and a norm
over the layer-L states, the target's head on the draft vocabulary) learns forward KL to the
target's next-token distribution at response positions, teacher-forced: at inference its input
is the target's own first L layers over the drafted sequence, exactly what the corpus recorded.
All exits train together on the same sequences (`distill.features.train.train`).

Then per L, on held-out responses: greedy acceptance replayed per K (and, for comparison, the
untrained read-off: the target's final norm and head applied at layer L); the assembled draft's
cost per step against the target's, in the formats `auto` picks; and the speedup the seed's formula
predicts with the target's measured verify cost. The best L is the one with the highest predicted
speedup; every exit is saved to `--out-dir`, its facts in training.json.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench import theory
from distill import prompts
from distill.evaluate import Replay, simulate_rounds
from distill.features.corpus import FeatureExample, FeatureStore
from distill.features.run import draft_vocabulary_of, progress_line
from distill.features.train import Trainee, TrainSettings, kl_and_agreement, fast_dtype, train
from distill.run import Progress
from draft_service.drafters import early_exit
from draft_service.drafters.early_exit import ExitConfig, ExitNet
from specdec import lm
from specdec.config import option, parse
from specdec.models import load_causal_lm

log = logging.getLogger("distill.early_exit")


@dataclass
class EarlyExitConfig:
    target: str = option("embedded", "the target: a Hugging Face directory, a hub id, a .gguf file, or 'embedded'")
    work_dir: str = option(".train-exits", "the feature corpus (corpus/), checkpoint and report")
    feature_layers: str = option("5,9,13,17,21,-1", "the target layers the corpus recorded, in its order (--feature-layers)")
    exits: str = option("6,10,14,18,22", "exits to train: L, the target layers each runs (the corpus must hold layer L - 1)")
    out_dir: str = option("drafts", "where each exit's directory (smollm2-exit-lL) is written")
    threads: int = option(0, "torch threads (0: torch's default)")
    draft_vocab: int = option(8192, "tokens of the exits' head (the most frequent of the target's responses, FR-Spec)")
    steps: int = option(2000, "most optimizer steps")
    train_minutes: float = option(0.0, "stop training after this long even before --steps; 0 = no limit")
    batch_tokens: int = option(4096, "response positions per optimizer step")
    learning_rate: float = option(5e-4, "peak AdamW learning rate")
    warmup_steps: int = option(20, "steps of linear warm-up")
    max_sequence: int = option(1024, "prompt + response tokens per training sequence")
    train_dtype: str = option("auto", "precision of training's matrix products (auto: the faster here)", ("auto", "float32", "bfloat16"))
    checkpoint_minutes: float = option(5.0, "minutes between checkpoints")
    eval_k: str = option("1,2,3,4", "draft lengths K replayed on held-out responses")
    skip_costs: bool = option(False, "skip timing the assembled drafts (tests)")
    seed: int = option(0, "seed for data order")


def exit_loss(column: int):
    """The teacher-forced loss of an exit reading the recorded columns [column, column + H)."""

    def loss(net: ExitNet, features: torch.Tensor, ids: torch.Tensor, log_p: torch.Tensor, start: int):
        hidden = features[:, column : column + net.head.shape[1]]  # [T - 1, H]: row t after reading ids[: t + 1]
        kl, agreement = kl_and_agreement(log_p, net(hidden)[start - 1 :])  # rows that predict the response tokens
        return kl, [agreement]

    return loss


@torch.inference_mode()
def held_out_flags(net: ExitNet, column: int, store: FeatureStore, example: FeatureExample) -> tuple[list[bool], list[bool]]:
    """Per response position, whether the trained exit's argmax, and whether the untrained
    read-off at layer L (the target's final norm and head), equal the target's greedy token."""
    features = store.features(example).float()
    start = len(example.prompt_ids)
    hidden = features[:, column : column + net.head.shape[1]]
    response = torch.tensor(example.response_ids)
    trained = net.vocabulary[net(hidden)[start - 1 :].argmax(-1)]
    untrained = net.vocabulary[net.target_log_probs(hidden[start - 1 :]).argmax(-1)]
    return (trained == response).tolist(), (untrained == response).tolist()


def acceptance(flags: list[tuple[str, list[bool]]], k_values: tuple[int, ...]) -> dict:
    report = {}
    for k in k_values:
        totals: dict[str, Replay] = defaultdict(lambda: Replay(drafted_at=[0] * k, accepted_at=[0] * k))
        for source, correct in flags:
            replay = simulate_rounds(correct, k)
            totals["all"].add(replay)
            totals[source].add(replay)
        report[f"k{k}"] = {source: replay.summary() for source, replay in sorted(totals.items())}
    return report


def costs(config: EarlyExitConfig, directories: dict[int, Path], max_k: int) -> dict:
    """The target's single step and verify curve, and each assembled exit's step, each in the
    format `auto` picks on this machine."""
    target = load_causal_lm(config.target, "cpu", "auto")
    target_choice = lm.choose_format(target)
    target_step = lm.forward_seconds(target.model, 1)
    facts = {"target_format": target_choice.format, "target_step_ms": 1e3 * target_step,
             "verify_cost": theory.verify_cost_curve(target, max_k + 1, repeats=5), "exits": {}}
    for layers, directory in directories.items():
        loaded, _ = early_exit.assemble(directory, load_causal_lm(config.target, "cpu", "float32"), "auto")
        choice = lm.choose_format(loaded)
        step = lm.forward_seconds(loaded.model, 1)
        facts["exits"][layers] = {"format": choice.format, "step_ms": 1e3 * step, "cost_ratio": step / target_step}
    return facts


def predicted(report: dict, cost: dict) -> dict:
    """Per exit, the best K and the speedup the seed's formula predicts, with the target's verify
    cost T(K + 1) / T(1) (the CPU-corrected curve) and with 1 (the paper's)."""
    out = {}
    for layers, facts in report.items():
        best = None
        for name, by_source in facts["acceptance"].items():
            k = int(name[1:])
            alpha = theory.alpha_from_tokens_per_forward(by_source["all"]["tokens_per_target_forward"], k)
            ratio = cost["exits"][layers]["cost_ratio"]
            corrected = theory.theoretical_speedup(alpha, k, ratio, cost["verify_cost"][k])
            candidate = {"k": k, "alpha": alpha, "speedup": corrected, "speedup_flat_verify": theory.theoretical_speedup(alpha, k, ratio)}
            if best is None or corrected > best["speedup"]:
                best = candidate
        out[layers] = best
    return out


def main(argv: list[str] | None = None) -> None:
    config = parse(EarlyExitConfig, "python -m distill.early_exit", "SPECDEC_EXITS", "Train early exits of a target on its own hidden states.", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if config.threads:
        torch.set_num_threads(config.threads)
    work = Path(config.work_dir)
    store = FeatureStore(work / "corpus")
    recorded = [int(x) for x in config.feature_layers.split(",")]
    exits = [int(x) for x in config.exits.split(",")]
    missing = [layers for layers in exits if layers - 1 not in recorded]
    if missing or recorded[-1] != -1:
        raise SystemExit(f"the corpus must record layer L - 1 for every exit (missing: {missing}) and the last layer (-1) last")
    target = load_causal_lm(config.target, "cpu", "float32")
    width = target.model.config.hidden_size
    vocabulary = draft_vocabulary_of(config, store, target, work / "draft_vocabulary.json")
    columns = {layers: recorded.index(layers - 1) * width for layers in exits}
    trainees = [
        Trainee(f"exit-l{layers}", ExitNet.initialized(ExitConfig(config.target, layers), target.model, vocabulary), loss=exit_loss(columns[layers]))
        for layers in exits
    ]
    settings = TrainSettings(
        steps=config.steps, time_budget_s=config.train_minutes * 60, batch_tokens=config.batch_tokens, learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps, max_sequence=config.max_sequence, unroll=0, decay=1.0,
        bfloat16=(fast_dtype() if config.train_dtype == "auto" else config.train_dtype) == "bfloat16",
        checkpoint_every_s=config.checkpoint_minutes * 60, seed=config.seed,
    )
    progress = Progress()
    started = time.monotonic()
    state = train(trainees, store, lambda: [e for e in store.examples() if e.split == prompts.TRAIN], settings, work / "exits-checkpoint.pt",
                  progress_line(progress))
    held_out = [e for e in store.examples() if e.split == prompts.HELD_OUT]
    k_values = tuple(int(k) for k in config.eval_k.split(","))
    report, directories = {}, {}
    for layers, trainee in zip(exits, trainees):
        net = trainee.net.eval()
        flags = [(e.source, held_out_flags(net, columns[layers], store, e)) for e in held_out]
        report[layers] = {
            "trained_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "acceptance": acceptance([(source, trained) for source, (trained, _) in flags], k_values),
            "untrained_top1": sum(sum(u) for _, (_, u) in flags) / max(1, sum(len(u) for _, (_, u) in flags)),
            "trained_top1": sum(sum(t) for _, (t, _) in flags) / max(1, sum(len(t) for _, (t, _) in flags)),
        }
        directories[layers] = Path(config.out_dir) / early_exit.shipped_name(layers)
        net.save(directories[layers])
    summary = {"config": asdict(config), "training": state, "held_out_responses": len(held_out),
               "held_out_tokens": sum(len(e.response_ids) for e in held_out), "exits": report}
    if not config.skip_costs:
        summary["costs"] = costs(config, directories, max(k_values))
        summary["predicted"] = predicted(report, summary["costs"])
        summary["best_exit"] = max(summary["predicted"], key=lambda layers: summary["predicted"][layers]["speedup"])
    summary["seconds"] = time.monotonic() - started
    for layers, directory in directories.items():
        (directory / "training.json").write_text(json.dumps({**summary, "exit": layers}, indent=2) + "\n")
    (work / "exits-report.json").write_text(json.dumps(summary, indent=2) + "\n")
    for layers, facts in report.items():
        k4 = facts["acceptance"].get("k4", next(iter(facts["acceptance"].values())))["all"]
        log.info("exit after %d layers: top-1 %.3f (untrained %.3f), %.2f tokens per target forward at K=4; predicted %s",
                 layers, facts["trained_top1"], facts["untrained_top1"], k4["tokens_per_target_forward"],
                 json.dumps(summary.get("predicted", {}).get(layers)))


if __name__ == "__main__":
    main()
