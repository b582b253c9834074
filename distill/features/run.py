"""`python -m distill.features`: feature corpus -> feature drafters trained -> held-out acceptance
-> shipped directories. Every stage resumes from the work directory."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distill import prompts
from distill.features.corpus import FeatureStore, generate
from distill.features.evaluate import acceptance_report
from distill.features.train import Trainee, TrainSettings, fast_dtype, train
from distill.run import Progress
from distill.students import coverage, draft_vocabulary
from draft_service.drafters import feature_net
from draft_service.drafters.feature import DRAFTERS
from specdec import lm, native
from specdec.chat import chat_token_ids
from specdec.config import option, parse
from specdec.models import load_causal_lm

log = logging.getLogger("distill.features")


@dataclass
class FeatureDistillConfig:
    target: str = option("embedded", "the target: a Hugging Face directory, a hub id, a .gguf file, or 'embedded'")
    data_dir: str = option("../shared/data", "folder with gsm8k_train.jsonl and humaneval.jsonl (never Spec-Bench)")
    work_dir: str = option(".train-features", "feature corpus, checkpoint and report; a rerun resumes from here")
    out_dir: str = option("drafts", "where the trained drafters' directories are written")
    threads: int = option(0, "torch threads (0: torch's default)")
    generation_format: str = option("bfloat16", "the target's weights while writing the corpus (q4_1, q8_0: our native pass, fast without bf16)",
                                    ("float32", "bfloat16", "q4_1", "q8_0"))
    feature_layers: str = option("-1", "target decoder layers read, comma-separated, the last one -1 (e.g. 3,15,-1: EAGLE-3 style)")
    gsm8k_prompts: int = option(1000, "GSM8K questions among the prompts (the rest of the corpus: passages, documentation, code, chat, translation)")
    prompts_per_source: int = option(0, "use only the first N prompts of each source; 0 = all (tests use a few)")
    held_out_fraction: float = option(0.05, "share of prompts kept aside to measure acceptance")
    max_new_tokens: int = option(256, "longest response generated per prompt")
    max_prompt_tokens: int = option(1024, "prompts longer than this are skipped")
    generation_batch: int = option(48, "sequences decoded together")
    generation_minutes: float = option(0.0, "stop admitting prompts after this long; 0 = answer every prompt")
    stop_after: str = option("", "stop after this stage", ("", "corpus"))
    train_while_generating: bool = option(False, "train on the corpus written so far while another process is still writing it (--stop-after corpus); each epoch reads it again")
    draft_vocab: int = option(8192, "tokens of the drafters' head (the most frequent of the target's responses, FR-Spec); 0: all")
    mtp_heads: int = option(4, "multi-token heads (the most tokens they draft per round); 0: train the chain drafter only")
    steps: int = option(4000, "most optimizer steps")
    train_minutes: float = option(0.0, "stop training after this long even before --steps; 0 = no limit")
    batch_tokens: int = option(4096, "response positions per optimizer step")
    learning_rate: float = option(1e-3, "peak AdamW learning rate")
    warmup_steps: int = option(50, "steps of linear warm-up")
    max_sequence: int = option(1024, "prompt + response tokens per training sequence")
    unroll: int = option(4, "chain drafter: training steps on its own predictions (the draft positions it learns)")
    unroll_decay: float = option(0.8, "weight of unrolled step j's loss: decay^j")
    train_dtype: str = option("auto", "precision of training's matrix products (auto: the faster here)", ("auto", "float32", "bfloat16"))
    checkpoint_minutes: float = option(5.0, "minutes between checkpoints")
    eval_k: str = option("4", "draft lengths K replayed in the held-out acceptance report")
    eval_per_source: int = option(0, "held-out responses replayed per source (0: all)")
    seed: int = option(0, "seed for initialization and data order")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.feature_layers.split(","))


def _decoded(store: FeatureStore, tokenizer, prefix: str) -> dict[str, str]:
    return {e.key: tokenizer.decode(e.response_ids, skip_special_tokens=True) for e in store.examples() if e.key.startswith(prefix)}


def build_corpus(config: FeatureDistillConfig, target, store: FeatureStore, progress: Progress) -> None:
    """Four stages, each built on the target's answers of the earlier ones: passages; tasks over
    passages and documentation, GSM8K, HumanEval and instructions; back-translations and second
    chat turns."""
    forward_path = lm.path_for(target.model, config.generation_format)
    layers = config.layers
    deadline = time.monotonic() + config.generation_minutes * 60 if config.generation_minutes else float("inf")
    held_out = config.held_out_fraction
    limit = config.prompts_per_source

    def stage(name: str, items: list[prompts.Prompt]) -> None:
        encoded = [(p, chat_token_ids(target.tokenizer, p.messages)) for p in items]
        encoded = [(p, ids) for p, ids in encoded if len(ids) <= config.max_prompt_tokens]
        encoded.sort(key=lambda item: -len(item[1]))  # long prefills first, while the batch is fresh
        progress.restart()
        generate(forward_path, encoded, store, target.eos_token_ids, layers, config.generation_batch, config.max_new_tokens,
                 deadline=deadline, progress=lambda d, t: progress.count(name, d, t))

    stage("passages", prompts.passage_prompts(limit))
    passages = _decoded(store, target.tokenizer, "passage/")
    base = prompts.base_prompts(Path(config.data_dir), held_out, limit)
    gsm8k = [p for p in base if p.source == "gsm8k"][: config.gsm8k_prompts]
    documentation = prompts.documentation_prompts(prompts.documentation_passages(limit), held_out)
    stage("tasks", prompts.context_prompts(passages, held_out) + documentation + gsm8k + [p for p in base if p.source != "gsm8k"])
    translations = {k: v for prefix in ("context/translation/", "docs/translation/") for k, v in _decoded(store, target.tokenizer, prefix).items()}
    answers = {e.key: target.tokenizer.decode(e.response_ids, skip_special_tokens=True) for e in store.examples()}
    first_turns = [(p, answers[p.key]) for i, p in enumerate(base) if p.source == "instructions" and i % 3 == 0 and p.key in answers]
    stage("turns", prompts.back_translation_prompts(translations, held_out) + prompts.follow_up_prompts(first_turns, held_out))


def describe(store: FeatureStore) -> dict:
    examples = store.examples()
    facts = {}
    for split in (prompts.TRAIN, prompts.HELD_OUT):
        chosen = [e for e in examples if e.split == split]
        facts[split] = {
            "examples": len(chosen),
            "response_tokens": sum(len(e.response_ids) for e in chosen),
            "feature_rows": sum(len(e.ids) - 1 for e in chosen),
            "by_source": dict(sorted(Counter(e.source for e in chosen).items())),
        }
    return facts


def main(argv: list[str] | None = None) -> None:
    config = parse(FeatureDistillConfig, "python -m distill.features", "SPECDEC_FEATURES", "Train feature drafters on a target's own hidden states.", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if config.threads:
        torch.set_num_threads(config.threads)
        native.set_threads(config.threads)
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(work / "corpus")
    progress = Progress()
    started = time.monotonic()
    target = load_causal_lm(config.target, "cpu", "float32")
    if not config.train_while_generating:
        build_corpus(config, target, store, progress)
        corpus_facts = {**describe(store), "seconds": time.monotonic() - started}
        log.info("corpus: %s", json.dumps(corpus_facts))
        (work / "corpus.json").write_text(json.dumps({"config": asdict(config), "corpus": corpus_facts}, indent=2) + "\n")
    if config.stop_after == "corpus":
        return

    vocabulary = draft_vocabulary_of(config, store, target, work / "draft_vocabulary.json")
    trainees = [Trainee("chain", feature_net.build(net_config(config, target, feature_net.CHAIN), target.model, vocabulary))]
    if config.mtp_heads:
        trainees.append(Trainee("multi-token", feature_net.build(net_config(config, target, feature_net.MULTI_TOKEN), target.model, vocabulary)))
    settings = TrainSettings(
        steps=config.steps,
        time_budget_s=config.train_minutes * 60,
        batch_tokens=config.batch_tokens,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        max_sequence=config.max_sequence,
        unroll=config.unroll,
        decay=config.unroll_decay,
        bfloat16=(fast_dtype() if config.train_dtype == "auto" else config.train_dtype) == "bfloat16",
        checkpoint_every_s=config.checkpoint_minutes * 60,
        seed=config.seed,
    )
    progress.restart()
    state = train(trainees, store, lambda: [e for e in store.examples() if e.split == prompts.TRAIN], settings, work / "checkpoint.pt", progress_line(progress))
    held_out = [e for e in store.examples() if e.split == prompts.HELD_OUT]
    if config.eval_per_source:
        kept = Counter()
        held_out = [e for e in held_out if (kept.update([e.source]) or kept[e.source] <= config.eval_per_source)]
    report = {"config": asdict(config), "corpus": describe(store), "training": state, "drafters": {}}
    k_values = tuple(int(k) for k in config.eval_k.split(","))
    for trainee in trainees:
        net = trainee.net.eval()
        drafter = DRAFTERS[net.config.kind](net, target, trainee.name)
        facts = {
            "kind": net.config.kind,
            "trained_parameters": sum(p.numel() for p in net.parameters()),
            "draft_vocabulary": len(vocabulary),
            "held_out_coverage": coverage(Counter(t for e in held_out for t in e.response_ids), vocabulary),
            "held_out_acceptance": acceptance_report(drafter, store, held_out, k_values),
        }
        report["drafters"][trainee.name] = facts
        log.info("%s: held-out %s", trainee.name, json.dumps(facts["held_out_acceptance"]))
        out = Path(config.out_dir) / f"smollm2-feature-{trainee.name}"
        net.save(out)
        (out / "training.json").write_text(json.dumps({**facts, "training": state, "corpus": report["corpus"], "config": asdict(config)}, indent=2) + "\n")
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def draft_vocabulary_of(config: FeatureDistillConfig, store: FeatureStore, target, path: Path) -> torch.Tensor:
    """The head's token ids: the most frequent of the training responses, chosen once and kept
    beside the checkpoint (a resumed run on a grown corpus must keep the same head)."""
    if path.exists():
        return torch.tensor(json.loads(path.read_text()))
    counts = Counter(t for e in store.examples() if e.split == prompts.TRAIN for t in e.response_ids)
    vocabulary = draft_vocabulary(counts, config.draft_vocab, target.vocab_size, target.eos_token_ids)
    path.write_text(json.dumps(vocabulary.tolist()))
    return vocabulary


def net_config(config: FeatureDistillConfig, target, kind: str) -> feature_net.FeatureNetConfig:
    heads = config.mtp_heads if kind == feature_net.MULTI_TOKEN else 0
    return feature_net.FeatureNetConfig.for_target(kind, target.model.config, config.target, config.layers, heads)


def progress_line(progress: Progress):
    def report(step: int, fraction: float, trainees: list[Trainee], tokens: int) -> None:
        if progress.first_tokens is None:
            progress.first_tokens, progress.first_progress = tokens, fraction
        if not progress.due():
            return
        elapsed = time.monotonic() - progress.started
        parts = []
        for t in trainees:
            agreement = [sum(a[i] for a in t.agreement) / len(t.agreement) for i in range(len(t.agreement[-1]))]
            parts.append(f"{t.name}: kl {sum(t.losses) / len(t.losses):.3f} top1 " + "/".join(f"{a:.2f}" for a in agreement))
        rate = (tokens - progress.first_tokens) / max(elapsed, 1e-9)
        print(f"[train] step {step} {100 * fraction:.1f}% {rate:.0f} tok/s | " + " | ".join(parts), file=sys.stderr, flush=True)

    return report
