"""The distillation command: corpus -> students -> distillation -> held-out acceptance -> model
directories with model cards. Every stage resumes from the work directory."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distill import corpus, prompts
from distill.distill import DistillSettings, Student, distill
from distill.evaluate import acceptance_report
from distill.students import StudentSpec, build_student, coverage, draft_vocabulary, parse_students, save_student
from specdec.config import option, parse
from specdec.models import load_causal_lm

log = logging.getLogger("distill")

DEFAULT_STUDENTS = "smollm2-draft-l6=6x288/8192,smollm2-draft-l2=2x128/8192"


@dataclass
class DistillConfig:
    target: str = option("embedded", "the target to distill: a Hugging Face directory, a hub id, a .gguf file, or 'embedded'")
    students: str = option(DEFAULT_STUDENTS, "comma-separated NAME=LAYERSxHIDDEN[/DRAFT_VOCAB][+random]; /0: the full vocabulary, +random: no PCA embedding init")
    data_dir: str = option("../shared/data", "folder with gsm8k_train.jsonl and humaneval.jsonl (never Spec-Bench)")
    work_dir: str = option(".train", "corpus, checkpoint and report; a rerun resumes from here")
    out_dir: str = option("drafts", "where each trained draft's model directory is written")
    device: str = option("cpu", "torch device for target and students, e.g. cuda")
    target_dtype: str = option("float32", "the target's dtype while generating and teaching", ("float32", "bfloat16", "float16"))
    save_dtype: str = option("bfloat16", "dtype of the saved draft weights", ("float32", "bfloat16", "float16"))
    prompts_per_source: int = option(0, "use only the first N prompts of each source (GSM8K, HumanEval, instructions, passages); 0 = all")
    held_out_fraction: float = option(0.05, "share of prompts kept aside to measure acceptance")
    sampled_responses: bool = option(True, "after the greedy responses, also train on sampled ones (temperature 0.8) while generation time lasts")
    max_new_tokens: int = option(256, "longest response generated per prompt")
    max_prompt_tokens: int = option(768, "prompts longer than this are skipped")
    generation_batch: int = option(64, "prompts answered per generate() call")
    generation_minutes: float = option(0.0, "stop generating after this long (the corpus so far is used); 0 = answer every prompt")
    steps: int = option(2000, "most optimizer steps")
    train_minutes: float = option(0.0, "stop training after this long even before --steps; 0 = no limit")
    batch_tokens: int = option(16384, "padded tokens per training batch")
    learning_rate: float = option(1.5e-3, "peak AdamW learning rate")
    warmup_steps: int = option(100, "steps of linear warm-up")
    max_sequence: int = option(1024, "prompt + response tokens per training sequence")
    eval_k: str = option("1,2,4,8", "draft lengths K replayed in the held-out acceptance report")
    checkpoint_minutes: float = option(2.0, "minutes between checkpoints")
    seed: int = option(0, "seed for initialization, batching and sampled responses")


def eta_seconds(progress: float, elapsed: float, progress_at_start: float = 0.0) -> float:
    """Seconds left at the rate of progress since this run started."""
    gained = progress - progress_at_start
    return elapsed * (1 - progress) / gained if gained > 0 else float("inf")


class Progress:
    """One line per few seconds: stage, done/total or progress, rate and ETA (stderr)."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self.restart()

    def restart(self) -> None:
        self.last, self.started, self.first_tokens = 0.0, time.monotonic(), None

    def due(self, final: bool = False) -> bool:
        now = time.monotonic()
        if final or now - self.last >= self.every_s:
            self.last = now
            return True
        return False

    def count(self, stage: str, done: int, total: int) -> None:
        if self.due(done >= total):
            elapsed = time.monotonic() - self.started
            eta = eta_seconds(done / total, elapsed) if total else 0.0
            print(f"[{stage}] {done}/{total} elapsed {elapsed:.0f}s eta {eta:.0f}s", file=sys.stderr, flush=True)

    def training(self, step: int, progress: float, students: list[Student], tokens: int) -> None:
        if self.first_tokens is None:  # a resumed run starts from the checkpoint's count and progress
            self.first_tokens, self.first_progress = tokens, progress
        if self.due():
            elapsed = time.monotonic() - self.started
            losses = " ".join(f"{s.name}: kl {sum(s.losses) / len(s.losses):.3f} top1 {sum(s.agreement) / len(s.agreement):.3f}" for s in students)
            print(
                f"[train] step {step} {100 * progress:.1f}% {(tokens - self.first_tokens) / max(elapsed, 1e-9):.0f} tok/s eta {eta_seconds(progress, elapsed, self.first_progress):.0f}s | {losses}",
                file=sys.stderr,
                flush=True,
            )


def build_corpus(config: DistillConfig, target, progress: Progress) -> list[corpus.Example]:
    path = Path(config.work_dir) / "corpus.jsonl"
    deadline = time.monotonic() + config.generation_minutes * 60 if config.generation_minutes else float("inf")
    generate = dict(
        path=path,
        batch_size=config.generation_batch,
        max_new_tokens=config.max_new_tokens,
        max_prompt_tokens=config.max_prompt_tokens,
        seed=config.seed,
        deadline=deadline,
    )

    def stage(name: str, items: list[prompts.Prompt], mode: str) -> None:
        progress.restart()
        corpus.generate_corpus(target, items, mode=mode, progress=lambda d, t: progress.count(name, d, t), **generate)

    passages = prompts.passage_prompts(config.prompts_per_source)
    stage("passages", passages, corpus.GREEDY)
    written = {e.key: target.tokenizer.decode(e.response_ids, skip_special_tokens=True) for e in corpus.read_corpus(path) if e.key.startswith("passage/")}
    base = prompts.base_prompts(Path(config.data_dir), config.held_out_fraction, config.prompts_per_source)
    everything = prompts.context_prompts(written, config.held_out_fraction) + base
    stage("greedy", everything, corpus.GREEDY)
    if config.sampled_responses:
        stage("sampled", [p for p in everything + passages if p.split == prompts.TRAIN], corpus.SAMPLED)
    return corpus.read_corpus(path)


def describe(examples: list[corpus.Example]) -> dict:
    by_source = Counter(e.source for e in examples)
    return {
        "examples": len(examples),
        "response_tokens": sum(len(e.response_ids) for e in examples),
        "by_source": dict(sorted(by_source.items())),
        "by_mode": dict(Counter(e.mode for e in examples)),
    }


def model_card(spec: StudentSpec, student: torch.nn.Module, facts: dict) -> str:
    k4 = facts["held_out_acceptance"]["k4"]["all"]
    per_source = "\n".join(
        f"| {source} | {row['tokens_per_target_forward']:.2f} | {row['acceptance_rate']:.2f} |"
        for source, row in facts["held_out_acceptance"]["k4"].items()
    )
    return f"""# {spec.name}

A draft model for speculative decoding with the target `{facts['target']}`, distilled by
`python -m distill` (specdec). It shares the target's tokenizer; load it in
draft_service with `--model <this directory>`.

## Architecture
Llama, {spec.layers} layers, hidden size {spec.hidden}, {student.config.num_attention_heads} attention heads
({student.config.num_key_value_heads} key/value heads), MLP {student.config.intermediate_size}, vocabulary
{student.config.vocab_size} (input), output head tied to the input embedding and restricted to a draft
vocabulary of {facts['draft_vocabulary']} tokens ({DRAFT_VOCAB_NOTE}). Parameters: {facts['parameters']:,}
({facts['non_embedding_parameters']:,} outside the embedding). Embedding initialized from
{'a PCA projection of the target embedding' if spec.pca_init else 'random values'}. Weights stored in {facts['save_dtype']}.

## Training
Knowledge distillation, forward KL to the target's next-token distribution on the response tokens
of {facts['corpus']['train']['examples']:,} target-generated responses
({facts['corpus']['train']['response_tokens']:,} response tokens; by source
{facts['corpus']['train']['by_source']}; by mode {facts['corpus']['train']['by_mode']}), prompts
from GSM8K train, HumanEval and instruction templates (never Spec-Bench). {facts['steps']:,} steps,
{facts['trained_tokens']:,} trained positions, {facts['train_seconds']:.0f} s on {facts['device']};
final KL {facts['final_kl']:.3f}, top-1 agreement with the target {facts['final_top1']:.3f} (training batches).
Draft vocabulary coverage of held-out target tokens: {facts['held_out_coverage']:.3f}.

## Held-out acceptance (greedy, replayed offline on {facts['corpus']['held_out']['examples']} held-out target responses)
K=4: {k4['tokens_per_target_forward']:.2f} tokens per target forward, acceptance rate {k4['acceptance_rate']:.2f},
per position {', '.join(f'{a:.2f}' for a in k4['accepted_per_position'])}.

| source | tokens per target forward (K=4) | acceptance rate |
| --- | --- | --- |
{per_source}

Full report: `training.json`.
"""


DRAFT_VOCAB_NOTE = "the most frequent tokens of the target's training responses, FR-Spec style"


def main(argv: list[str] | None = None) -> None:
    config = parse(DistillConfig, "python -m distill", "SPECDEC_DISTILL", "Distill draft models from a target.", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    specs = parse_students(config.students)
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    started = time.monotonic()
    target = load_causal_lm(config.target, config.device, config.target_dtype)
    examples = build_corpus(config, target, progress)
    train = [e for e in examples if e.split == prompts.TRAIN]
    held_out = [e for e in examples if e.split == prompts.HELD_OUT and e.mode == corpus.GREEDY]
    corpus_facts = {"train": describe(train), "held_out": describe(held_out), "generation_seconds": time.monotonic() - started}
    log.info("corpus: %s", json.dumps(corpus_facts))

    token_counts = Counter(t for e in train for t in e.response_ids)
    held_out_counts = Counter(t for e in held_out for t in e.response_ids)
    vocab_size = target.model.config.vocab_size
    students = []
    for spec in specs:
        vocabulary = draft_vocabulary(token_counts, spec.draft_vocab, vocab_size, target.eos_token_ids)
        students.append(Student(spec.name, build_student(spec, target.model, config.seed), vocabulary))
    settings = DistillSettings(
        steps=config.steps,
        time_budget_s=config.train_minutes * 60,
        batch_tokens=config.batch_tokens,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        max_sequence=config.max_sequence,
        checkpoint_every_s=config.checkpoint_minutes * 60,
        seed=config.seed,
    )
    progress.restart()
    state = distill(target.model, students, train, settings, work / "checkpoint.pt", target.eos_token_ids[0], progress.training)

    k_values = tuple(int(k) for k in config.eval_k.split(","))
    report = {"config": asdict(config), "corpus": corpus_facts, "students": {}}
    for spec, student in zip(specs, students):
        model = student.model.float()
        facts = {
            "target": config.target,
            "device": config.device,
            "save_dtype": config.save_dtype,
            "corpus": corpus_facts,
            "draft_vocabulary": len(student.vocabulary),
            "held_out_coverage": coverage(held_out_counts, student.vocabulary),
            "parameters": sum(p.numel() for p in model.parameters()),
            "non_embedding_parameters": sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel(),
            "steps": state["steps"],
            "trained_tokens": state["tokens"],
            "train_seconds": state["seconds"],
            "final_kl": sum(student.losses) / max(1, len(student.losses)),
            "final_top1": sum(student.agreement) / max(1, len(student.agreement)),
            "held_out_acceptance": acceptance_report(model, student.vocabulary, held_out, k_values, config.device),
        }
        report["students"][spec.name] = facts
        save_student(model.cpu(), student.vocabulary, target.tokenizer, Path(config.out_dir) / spec.name, model_card(spec, model, facts), facts, getattr(torch, config.save_dtype))
        log.info("%s: held-out K=4 %s", spec.name, json.dumps(facts["held_out_acceptance"]["k4"]["all"]))
    report["seconds"] = time.monotonic() - started
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
