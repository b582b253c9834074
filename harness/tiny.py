"""Tiny random models that stand in for the target and the draft where a real model would cost
minutes: Llamas (hidden 32, 2 layers) built with from_config, in memory for in-process tests, or
saved as a Hugging Face directory with the embedded tokenizer for real service processes (the
soak, latency and namespace tools' `--quick`). Their outputs are meaningless; their initializer
range is large so that distributions are peaked and greedy ties, which would make equality tests
flaky, do not happen.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.models import LoadedModel


def tiny_lm(
    seed: int, vocab_size: int, tokenizer=None, max_context: int = 512, eos: tuple[int, ...] = (2,), name: str | None = None,
    init: float = 0.5, hidden: int = 32, layers: int = 2,
) -> LoadedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_context,
        initializer_range=init,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name or f"tiny-{seed}",
        device=torch.device("cpu"),
        dtype=torch.float32,
        eos_token_ids=eos,
        max_context=max_context,
    )


def with_eos(loaded: LoadedModel, eos: tuple[int, ...]) -> LoadedModel:
    return replace(loaded, eos_token_ids=eos)


def save_tiny_model(directory: Path) -> Path:
    """The tests' tiny target (seed 1), with the embedded tokenizer, saved in `directory`."""
    from orchestrator.server import load_tokenizer

    if not (directory / "config.json").is_file():
        tokenizer = load_tokenizer("embedded")
        loaded = tiny_lm(seed=1, vocab_size=len(tokenizer), tokenizer=tokenizer, name="tiny")
        loaded.model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def tiny_model_for(cleanup: contextlib.ExitStack) -> str:
    """A tiny model saved in a temporary directory that `cleanup` removes; its path (--quick)."""
    return str(save_tiny_model(Path(cleanup.enter_context(tempfile.TemporaryDirectory())) / "tiny"))
