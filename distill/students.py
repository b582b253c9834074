"""Draft architectures ("students"): small Llama models sharing the target's tokenizer.

Two techniques shape them:
- The input embedding starts as a PCA projection of the target's own embedding table onto the
  student's width, so token similarities the target learned are there from step 0. The output head
  is tied to that embedding (no extra parameters for a 49k-token head).
- The output head covers only a reduced draft vocabulary (FR-Spec): the most frequent tokens of the
  target's own outputs. On a tiny model a 49k-token head costs more than the layers; speculative
  decoding stays exact with any draft support, and the drafter maps head rows back to token ids
  (`DRAFT_VOCAB_FILE` beside the weights). Without that file the model is a plain full-vocabulary
  LM, so Hugging Face loads it like any other.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from draft_service.drafters.model import DRAFT_VOCAB_FILE

HEAD_DIM = 32
SPEC_PATTERN = re.compile(r"^(?P<name>[\w.-]+)=(?P<layers>\d+)x(?P<hidden>\d+)(/(?P<vocab>\d+))?(?P<random>\+random)?$")


@dataclass(frozen=True)
class StudentSpec:
    """`NAME=LAYERSxHIDDEN[/DRAFT_VOCAB][+random]`, e.g. `draft-l6=6x288/8192`.

    DRAFT_VOCAB 0 or absent keeps the full vocabulary; `+random` skips the PCA initialization
    (the ablation of that technique)."""

    name: str
    layers: int
    hidden: int
    draft_vocab: int = 0
    pca_init: bool = True

    @classmethod
    def parse(cls, text: str) -> "StudentSpec":
        match = SPEC_PATTERN.match(text.strip())
        if not match or int(match["hidden"]) % HEAD_DIM:
            raise ValueError(f"student spec {text!r} is not NAME=LAYERSxHIDDEN[/VOCAB][+random] with HIDDEN a multiple of {HEAD_DIM}")
        return cls(match["name"], int(match["layers"]), int(match["hidden"]), int(match["vocab"] or 0), not match["random"])


def parse_students(text: str) -> list[StudentSpec]:
    specs = [StudentSpec.parse(part) for part in text.split(",") if part.strip()]
    if len({s.name for s in specs}) != len(specs):
        raise ValueError("student names must differ")
    return specs


def student_config(spec: StudentSpec, target_config) -> LlamaConfig:
    heads = spec.hidden // HEAD_DIM
    kv_heads = next(k for k in (3, 2, 1) if heads % k == 0)
    return LlamaConfig(
        vocab_size=target_config.vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.hidden * 8 // 3 // 32 * 32,
        num_hidden_layers=spec.layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=target_config.max_position_embeddings,
        rope_parameters=dict(getattr(target_config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}),
        rms_norm_eps=target_config.rms_norm_eps,
        tie_word_embeddings=True,
        bos_token_id=target_config.bos_token_id,
        eos_token_id=target_config.eos_token_id,
        pad_token_id=getattr(target_config, "pad_token_id", None),
    )


def pca_embedding(target_embedding: torch.Tensor, width: int) -> torch.Tensor:
    """[V, D] target embeddings -> [V, width] coordinates on their top principal directions, scaled
    so that rows have the usual initialization's magnitude (std 0.02 per coordinate)."""
    centered = target_embedding.float() - target_embedding.float().mean(0, keepdim=True)  # [V, D]
    _, _, directions = torch.pca_lowrank(centered, q=width, center=False, niter=4)  # [D, width]
    projected = centered @ directions  # [V, width]
    return projected * (0.02 / projected.std())


def build_student(spec: StudentSpec, target: torch.nn.Module, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    student = LlamaForCausalLM(student_config(spec, target.config))
    if spec.pca_init:
        with torch.no_grad():
            embedding = target.get_input_embeddings().weight.detach().cpu()
            student.get_input_embeddings().weight.copy_(pca_embedding(embedding, spec.hidden))
    return student


def draft_vocabulary(token_counts: Counter, size: int, vocab_size: int, always: tuple[int, ...]) -> torch.Tensor:
    """The `size` most frequent ids of the target's outputs (plus `always`, e.g. EOS), sorted;
    every id when `size` is 0 or covers the vocabulary."""
    if not size or size >= vocab_size:
        return torch.arange(vocab_size)
    chosen = list(dict.fromkeys(list(always) + [token for token, _ in token_counts.most_common()]))[:size]
    if len(chosen) < size:  # fewer distinct tokens than asked: fill with the lowest unused ids
        unused = (i for i in range(vocab_size) if i not in set(chosen))
        chosen += [next(unused) for _ in range(size - len(chosen))]
    return torch.tensor(sorted(chosen))


def coverage(token_counts: Counter, vocabulary: torch.Tensor) -> float:
    """Fraction of the counted tokens inside `vocabulary`."""
    inside = set(vocabulary.tolist())
    total = sum(token_counts.values())
    return sum(n for token, n in token_counts.items() if token in inside) / total if total else 0.0


def save_student(student: LlamaForCausalLM, vocabulary: torch.Tensor, tokenizer, directory: Path, card: str, metadata: dict, dtype=torch.bfloat16) -> None:
    """A Hugging Face model directory: weights (in `dtype`), config, tokenizer, the draft
    vocabulary when it is reduced, a JSON of training facts and the model card."""
    directory.mkdir(parents=True, exist_ok=True)
    student.to(dtype).save_pretrained(directory)
    student.float()
    tokenizer.save_pretrained(directory)
    if len(vocabulary) < student.config.vocab_size:
        save_file({"token_ids": vocabulary.to(torch.int32).contiguous()}, str(directory / DRAFT_VOCAB_FILE))
    (directory / "training.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (directory / "README.md").write_text(card)
