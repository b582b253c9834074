"""A tiny random model with the embedded tokenizer, saved as a Hugging Face directory: lets the
soak, latency and namespace tools start real service subprocesses in seconds, to check that they
work (`--quick`), where the embedded models would take minutes. Its outputs are meaningless."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path


def save_tiny_model(directory: Path) -> Path:
    """The tests' tiny target (tests/helpers.py), with the embedded tokenizer, saved in `directory`."""
    from orchestrator.server import load_tokenizer
    from tests.helpers import tiny_lm

    if not (directory / "config.json").is_file():
        tokenizer = load_tokenizer("embedded")
        loaded = tiny_lm(seed=1, vocab_size=len(tokenizer), tokenizer=tokenizer, name="tiny")
        loaded.model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def tiny_model_for(cleanup: contextlib.ExitStack) -> str:
    """A tiny model saved in a temporary directory that `cleanup` removes; its path (--quick)."""
    return str(save_tiny_model(Path(cleanup.enter_context(tempfile.TemporaryDirectory())) / "tiny"))
