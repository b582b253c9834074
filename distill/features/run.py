"""`python -m distill.features`: feature corpus -> feature drafters trained -> held-out acceptance
-> shipped directories. Every stage resumes from the work directory."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distill import prompts
from distill.features.corpus import FeatureStore, generate
from distill.run import Progress
from specdec.chat import chat_token_ids
from specdec.config import option, parse
from specdec.lean_llama import LeanLlama
from specdec.models import load_causal_lm

log = logging.getLogger("distill.features")


@dataclass
class FeatureDistillConfig:
    target: str = option("embedded", "the target: a Hugging Face directory, a hub id, a .gguf file, or 'embedded'")
    data_dir: str = option("../shared/data", "folder with gsm8k_train.jsonl and humaneval.jsonl (never Spec-Bench)")
    work_dir: str = option(".train-features", "feature corpus, checkpoint and report; a rerun resumes from here")
    out_dir: str = option("drafts", "where the trained drafters' directories are written")
    threads: int = option(0, "torch threads (0: torch's default)")
    generation_format: str = option("bfloat16", "weight format of the target while writing the corpus", ("float32", "bfloat16"))
    feature_layers: str = option("-1", "target decoder layers read, comma-separated, the last one -1 (e.g. 3,15,-1: EAGLE-3 style)")
    gsm8k_prompts: int = option(1000, "GSM8K questions among the prompts (the rest of the corpus: passages, documentation, code, chat, translation)")
    prompts_per_source: int = option(0, "use only the first N prompts of each source; 0 = all (tests use a few)")
    held_out_fraction: float = option(0.05, "share of prompts kept aside to measure acceptance")
    max_new_tokens: int = option(256, "longest response generated per prompt")
    max_prompt_tokens: int = option(1024, "prompts longer than this are skipped")
    generation_batch: int = option(48, "sequences decoded together")
    generation_minutes: float = option(0.0, "stop admitting prompts after this long; 0 = answer every prompt")
    stop_after: str = option("", "stop after this stage", ("", "corpus"))
    seed: int = option(0, "seed for initialization and data order")


def _decoded(store: FeatureStore, tokenizer, prefix: str) -> dict[str, str]:
    return {e.key: tokenizer.decode(e.response_ids, skip_special_tokens=True) for e in store.examples() if e.key.startswith(prefix)}


def build_corpus(config: FeatureDistillConfig, target, store: FeatureStore, progress: Progress) -> None:
    """Four stages, each built on the target's answers of the earlier ones: passages; tasks over
    passages and documentation, GSM8K, HumanEval and instructions; back-translations and second
    chat turns."""
    lean = LeanLlama(target.model, config.generation_format)
    layers = tuple(int(x) for x in config.feature_layers.split(","))
    deadline = time.monotonic() + config.generation_minutes * 60 if config.generation_minutes else float("inf")
    held_out = config.held_out_fraction
    limit = config.prompts_per_source

    def stage(name: str, items: list[prompts.Prompt]) -> None:
        encoded = [(p, chat_token_ids(target.tokenizer, p.messages)) for p in items]
        encoded = [(p, ids) for p, ids in encoded if len(ids) <= config.max_prompt_tokens]
        encoded.sort(key=lambda item: -len(item[1]))  # long prefills first, while the batch is fresh
        progress.restart()
        generate(lean, encoded, store, target.eos_token_ids, layers, config.generation_batch, config.max_new_tokens,
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
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(work / "corpus")
    progress = Progress()
    started = time.monotonic()
    target = load_causal_lm(config.target, "cpu", "float32")
    build_corpus(config, target, store, progress)
    corpus_facts = {**describe(store), "seconds": time.monotonic() - started}
    log.info("corpus: %s", json.dumps(corpus_facts))
    (work / "corpus.json").write_text(json.dumps({"config": asdict(config), "corpus": corpus_facts}, indent=2) + "\n")
    if config.stop_after == "corpus":
        return
