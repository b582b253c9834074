"""Weights in the form the processor multiplies fastest: each linear layer of the lean forward path
(specdec/lean_llama.py) as a callable over activations, in one of the weight formats below, and
`choose_format`, which picks the fastest by timing the real forward pass (never by CPU name).

| format   | weights                                         | activations | product                               |
|----------|-------------------------------------------------|-------------|---------------------------------------|
| float32  | as loaded                                       | float32     | F.linear (MKL)                        |
| bfloat16 | bf16; on CPU prepacked once for oneDNN (AMX)    | bfloat16    | mkldnn._linear_pointwise / F.linear   |
| float16  | fp16 (GPUs)                                     | float16     | F.linear                              |
| int8     | int8 per output channel, weight-only            | bfloat16    | aten._weight_int8pack_mm              |
| int4     | int4 in groups of 32 with a scale and a minimum | bfloat16    | aten._weight_int4pack_mm_for_cpu      |
|          | (the output head in int8, see HEAD_FORMAT)      |             |                                       |
| q4_1     | GGUF's Q4_1 blocks, the output head in Q8_0     | int8 per 32 | our native forward pass (whole model) |
| q8_0     | GGUF's Q8_0 blocks                              | int8 per 32 | our native forward pass (whole model) |

q4_1 and q8_0 are not products here but whole models run in one C call (specdec/native: the
per-operation dispatch of the torch path cost as much as its products); they are offered where a C
compiler is at hand, on CPUs, for Llama architectures with widths in whole blocks of 32.

Why these: on a single core the forward pass of a small model is bound by the bytes of weights it
reads (the embedded 135M target: 540 MB per step in float32, 270 in bf16, 67 in int4), so fewer
bytes per weight is faster as long as the kernel keeps up. oneDNN reorders bf16 weights into its
blocked layout on every call unless they are prepacked, which made plain bf16 slower than fp32.
int4 with groups of 32 and a per-group minimum is the layout of GGUF's Q4_1 (w = d * q + m), so
quantizing a model dequantized from Q4_1 recovers its own 4-bit weights.

The output head is where 4 bits cost most: on the embedded target (whose GGUF holds the layers in
Q4_1 but the tied embedding and head in Q8_0), greedy tokens teacher-forced on float32's output
agreed with float32's 88% of the time with an int4 head, 98% with an int8 head (99% in bf16), over
6 prompts x 64 tokens; so int4 keeps the head in int8.

Exactness: a format's product gives a row the same bits whatever the other rows of the batch
(checked in tests for bf16, int8 and int4: oneDNN and the int packs reduce in a fixed order); with
the lean path's per-query attention this makes a (K+1)-token verify score each token exactly as a
1-token step does, so greedy speculation equals target-only decoding bit for bit. float32 GEMMs
are not batch-invariant (MKL picks kernels by shape; differences ~1e-6, which move the argmax only
at genuine ties).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from specdec.models import partial_path

log = logging.getLogger(__name__)

FORMATS = ("float32", "bfloat16", "float16", "int8", "int4", "q4_1", "q8_0")
# Formats of whole models run by our own forward pass (specdec/native), not by products here.
NATIVE_FORMATS = ("q4_1", "q8_0")
AUTO = "auto"
INT4_GROUP = 32
# Acceptance assumed when `auto` weighs a verify of K+1 tokens against single steps: about what
# our drafters reach on Spec-Bench (n-grams 0.34, the l6 draft 0.3 at K=4; bench/results/).
AUTO_ACCEPTANCE = 0.4

Linear = Callable[[torch.Tensor], torch.Tensor]


# The format of the output head under each weight format (the others keep their own).
HEAD_FORMAT = {"int4": "int8"}


def activation_dtype(format: str) -> torch.dtype:
    """The dtype of activations (and of the KV cache) under a weight format."""
    return {"float32": torch.float32, "float16": torch.float16, "q4_1": torch.float32, "q8_0": torch.float32}.get(format, torch.bfloat16)


def _dense(weight: torch.Tensor, dtype: torch.dtype) -> Linear:
    weight = weight.detach().to(dtype).contiguous()
    if weight.device.type == "cpu" and dtype == torch.bfloat16:
        try:
            # batch-size hint 16: the verify shapes; the packed layout serves any batch size
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        except (RuntimeError, AttributeError) as error:  # torch without mkldnn: plain products
            log.info("bf16 weights not prepacked (%s): plain F.linear", error)
    return lambda x: F.linear(x, weight)


def _int8(weight: torch.Tensor) -> Linear:
    w = weight.detach().float()
    scale = w.abs().amax(1).clamp(min=1e-12) / 127  # [N]
    quantized = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
    scale = scale.to(torch.bfloat16)
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, quantized, scale)


def int4_blocks(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups as Q4_1 makes them: per group of `group` inputs, the step
    d = (max - min) / 15, q = round((w - min) / d) in [0, 15]; returns q [N, K] int32, d and min
    [N, K / group]. A group of equal weights has d = 0 and q = 0."""
    rows, columns = weight.shape
    grouped = weight.detach().float().view(rows, columns // group, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    step = (high - low) / 15
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.clamp(torch.round((grouped - low[..., None]) / safe[..., None]), 0, 15).to(torch.int32)
    return q.view(rows, columns), step, low


def _int4(weight: torch.Tensor, group: int = INT4_GROUP) -> Linear:
    q, step, low = int4_blocks(weight, group)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    # the kernel computes (q - 8) * scale + zero per group: zero = min + 8 d
    scales_and_zeros = torch.stack([step, low + 8 * step], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/g, N, 2]
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)


def supported(format: str, weight: torch.Tensor) -> bool:
    """Whether `format` can hold this weight on its device (the int packs are CPU kernels here,
    int4 needs input columns in whole groups)."""
    if format in ("int8", "int4") and weight.device.type != "cpu":
        return False
    return format != "int4" or weight.shape[1] % INT4_GROUP == 0


def make_linear(format: str, weight: torch.Tensor) -> Linear:
    """`weight` [N, K] as a callable x [M, K] -> [M, N], both in activation_dtype(format)."""
    if format == "int8":
        return _int8(weight)
    if format == "int4":
        return _int4(weight)
    return _dense(weight, activation_dtype(format))


def candidates(device: torch.device) -> tuple[str, ...]:
    """The formats `auto` times on this device: every CPU format (bf16 among them: whether it is
    fast depends on the CPU, which is measured, not assumed); on GPUs the usual half precision."""
    if device.type == "cpu":
        return ("float32", "bfloat16", "int8", "int4")
    return ("bfloat16", "float16") if device.type == "cuda" else ("float32",)


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a round of k drafts commits when each is accepted with probability `acceptance`."""
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


@dataclass(frozen=True)
class FormatChoice:
    format: str
    reason: str
    seconds_per_token: dict[str, float]  # per candidate: the cost `auto` compared


def choose_format(
    formats: tuple[str, ...], forward_seconds: Callable[[str, int], float], max_k: int = 4, acceptance: float = AUTO_ACCEPTANCE
) -> FormatChoice:
    """The format with the least expected seconds per committed token, each timed by
    `forward_seconds(format, n)` for one forward pass of n tokens: min over K in [0, max_k] of
    T(K + 1) / E(K), E at the acceptance our drafters reach, so that both a flat verify (where
    speculating pays) and a fast single step (where it does not) count for what they are worth."""
    costs: dict[str, float] = {}
    for format in formats:
        times = {n: forward_seconds(format, n) for n in sorted({1, 2, 3, max_k + 1})}
        costs[format] = min(times[k + 1] / expected_tokens(acceptance, k) for k in range(max_k + 1) if k + 1 in times)
    best = min(costs, key=costs.get)
    others = ", ".join(f"{f} {1000 * s:.1f}" for f, s in sorted(costs.items(), key=lambda item: item[1]))
    return FormatChoice(best, f"least expected ms per token at acceptance {acceptance}: {others}", costs)


def machine_key(model_name: str, config_json: str, device: torch.device, max_k: int) -> str:
    """What auto's choice depends on: the model, the processor, torch and the threads it runs."""
    processor = ""
    try:
        processor = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        processor = platform.processor()
    parts = [model_name, config_json, str(device), processor, torch.__version__, str(torch.get_num_threads()), str(max_k)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def load_choices(path: Path) -> dict[str, FormatChoice]:
    try:
        return {key: FormatChoice(**value) for key, value in json.loads(path.read_text()).items()}
    except (OSError, ValueError, TypeError):
        return {}


def save_choice(path: Path, key: str, choice: FormatChoice) -> None:
    """Add one choice to the cache file (written whole, then renamed: readers never see half)."""
    choices = {k: asdict(v) for k, v in load_choices(path).items()}
    choices[key] = asdict(choice)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    partial.write_text(json.dumps(choices, indent=1))
    partial.replace(path)
