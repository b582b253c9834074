"""A Llama-architecture model in GGUF's block formats, run by the native forward pass (llama.c):
the weight formats "q4_1" (layers in Q4_1, the output head in Q8_0, as the embedded GGUF stores
them) and "q8_0" (everything in Q8_0), with float32 activations and KV cache.

`NativeLlama.forward` has the signature and the packed-batch semantics of `LeanLlama.forward`
(specdec/lean_llama.py), over the same `SequenceCache` objects; which one a model runs is its
weight format's business (specdec/lm.py).

Rows of more than PER_QUERY_MAX new tokens (prompt prefills, which every mode runs alike) go
through the lean path in float32 over the model's own weights instead, writing the same cache
buffers: a matrix product over many rows is where BLAS beats int8 blocks on a CPU without int8
dot-product instructions (a 256-token prefill of the embedded target, one thread: 6.5 ms a token
in q4_1 against 4.0 in float32). For the embedded target those weights are the very values its
Q4_1 blocks hold (it is dequantized from them). Steps and verifies (up to 32 tokens a row) stay
native, so a token's logits there are the same bits whatever else the pass scores.
"""

from __future__ import annotations

import ctypes

import torch

from specdec import native, weights
from specdec.lean_llama import PER_QUERY_MAX, LeanLlama, supports_lean_path

# kinds in llama.c
_KIND = {"q4_1": 0, "q8_0": 1}
# the format of each part: (decoder layers, output head)
PARTS = {"q4_1": ("q4_1", "q8_0"), "q8_0": ("q8_0", "q8_0")}


def q4_1_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 of weight [N, K]: (nibbles [N, K / 32, 16] uint8, element i of a block in the low
    nibble of byte i and element i + 16 in the high one; steps d and minimums m [N, K / 32])."""
    q, step, low = weights.int4_blocks(weight, weights.INT4_GROUP)
    q = q.view(q.shape[0], -1, 32).to(torch.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    return nibbles.contiguous(), step.float().contiguous(), low.float().contiguous()


def q8_0_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 of weight [N, K]: (q [N, K / 32, 32] int8 in -127..127, scales d [N, K / 32])."""
    grouped = weight.detach().float().view(weight.shape[0], -1, 32)
    scale = grouped.abs().amax(-1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(grouped / safe[..., None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class QuantizedMatrix:
    """A weight [N, K] in a block format, holding the tensors its QMatrix points into."""

    def __init__(self, weight: torch.Tensor, format: str):
        if format == "q4_1":
            self.q, self.d, self.m = q4_1_blocks(weight)
        else:
            (self.q, self.d), self.m = q8_0_blocks(weight), None
        rows, cols = weight.shape
        self.struct = native.QMatrix(
            rows, cols, _KIND[format], 0, self.q.data_ptr(), self.d.data_ptr(), self.m.data_ptr() if self.m is not None else None
        )

    def dequantized(self) -> torch.Tensor:
        """The weights these blocks hold, float32 [N, K] (the reference the tests compare with)."""
        if self.m is None:
            return (self.q.float() * self.d[..., None]).flatten(1)
        q = torch.cat([self.q & 15, self.q >> 4], -1).float()
        return (q * self.d[..., None] + self.m[..., None]).flatten(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 -> [M, N] float32, one native product."""
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], self.struct.rows)
        if native.library().specdec_gemm(ctypes.byref(self.struct), x.shape[0], ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr())):
            raise MemoryError("native product: out of memory")
        return y


def supports(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether the native formats can run this model: (True, "") or (False, why not)."""
    if not supports_lean_path(model):
        return False, "not a Llama-architecture model"
    if next(model.parameters()).device.type != "cpu":
        return False, "the native forward pass runs on CPU"
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    widths = (config.hidden_size, config.intermediate_size, config.num_attention_heads * head_dim)
    if any(width % 32 for width in widths):
        return False, f"widths {widths} are not whole blocks of 32"
    ready, why = native.available()
    return (True, "") if ready else (False, why)


def _float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().contiguous()


class NativeLlama:
    def __init__(self, model: torch.nn.Module, format: str):
        config, base = model.config, model.model
        self.format = format
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        layer_format, head_format = PARTS[format]
        self.head_source = model.get_output_embeddings().weight  # [V', H]
        self.head = QuantizedMatrix(self.head_source, head_format)
        self.embedding = _float(base.embed_tokens.weight)  # [V, H]
        self.final_norm = _float(base.norm.weight)
        self.inv_freq = _float(base.rotary_emb.inv_freq)
        self._kept: list = []  # everything the structs point into lives as long as this object
        layers = (native.Layer * len(base.layers))()
        for index, layer in enumerate(base.layers):
            attention, mlp = layer.self_attn, layer.mlp
            projections = (attention.q_proj, attention.k_proj, attention.v_proj)
            bias = _float(torch.cat([p.bias for p in projections])) if projections[0].bias is not None else None
            parts = {
                "input_norm": _float(layer.input_layernorm.weight),
                "post_norm": _float(layer.post_attention_layernorm.weight),
                "qkv": QuantizedMatrix(torch.cat([p.weight for p in projections]), layer_format),
                "out": QuantizedMatrix(attention.o_proj.weight, layer_format),
                "gate_up": QuantizedMatrix(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), layer_format),
                "down": QuantizedMatrix(mlp.down_proj.weight, layer_format),
            }
            self._kept += [bias, *parts.values()]
            layers[index] = native.Layer(
                parts["input_norm"].data_ptr(),
                parts["post_norm"].data_ptr(),
                bias.data_ptr() if bias is not None else None,
                *(parts[name].struct for name in ("qkv", "out", "gate_up", "down")),
            )
        self._layers = layers
        self.n_layers = len(base.layers)
        self._prefill = LeanLlama(model, "float32")  # long rows (see the module's docstring)
        self.struct = native.Model(
            config.hidden_size, self.heads, self.kv_heads, self.head_dim, config.intermediate_size, self.n_layers,
            config.rms_norm_eps, base.rotary_emb.attention_scaling,
            self.inv_freq.data_ptr(), self.embedding.data_ptr(), self.final_norm.data_ptr(), self.head.struct, layers,
        )  # fmt: skip
        self._lib = native.library()

    def forward(
        self, caches: list, new_tokens: list[list[int]], logits_for_last: int | None = None, features: tuple[int, ...] = (), parents: list | None = None
    ):
        """As LeanLlama.forward: per row float32 logits [n_i or logits_for_last, V']; with
        `features`, also per row the outputs of those decoder layers [n_i, H x layers] (float32);
        `parents[i]` makes row i a tree (always attended per query here, whatever its length)."""
        trees = parents if parents is not None and any(tree is not None for tree in parents) else None
        long = [len(tokens) > PER_QUERY_MAX and (trees is None or trees[i] is None) for i, tokens in enumerate(new_tokens)]
        if not any(long):
            return self._native(caches, new_tokens, logits_for_last, features, trees)
        if all(long):
            return self._prefill.forward(caches, new_tokens, logits_for_last, features)
        parts = {}  # both kinds in one batch: two passes, results back in the rows' order
        for kind, run in ((True, self._prefill.forward), (False, self._native)):
            rows = [i for i, is_long in enumerate(long) if is_long == kind]
            chosen = ([caches[i] for i in rows], [new_tokens[i] for i in rows], logits_for_last, features)
            out = run(*chosen) if kind else run(*chosen, [trees[i] for i in rows] if trees else None)
            for position, i in enumerate(rows):
                parts[i] = (out[0][position], out[1][position]) if features else out[position]
        if not features:
            return [parts[i] for i in range(len(caches))]
        return [parts[i][0] for i in range(len(caches))], [parts[i][1] for i in range(len(caches))]

    @torch.inference_mode()
    def _native(self, caches: list, new_tokens: list[list[int]], logits_for_last: int | None, features: tuple[int, ...], trees=None):
        rows = len(caches)
        lengths = [len(tokens) for tokens in new_tokens]
        past = [cache.length for cache in caches]
        for cache, n in zip(caches, lengths):
            cache.reserve(self.n_layers, self.kv_heads, self.head_dim, cache.length + n, torch.float32)
        keys = (ctypes.c_void_p * (rows * self.n_layers))(*[t.data_ptr() for c in caches for t in c.keys[: self.n_layers]])
        values = (ctypes.c_void_p * (rows * self.n_layers))(*[t.data_ptr() for c in caches for t in c.values[: self.n_layers]])
        capacity = [cache.keys[0].shape[2] for cache in caches]
        kept, end = [], 0
        for n in lengths:
            end += n
            kept.extend(range(end - min(logits_for_last or n, n), end))
        logits = torch.empty(len(kept), self.head.struct.rows)
        wanted = [index % self.n_layers for index in features]
        hidden = torch.empty(end, self.hidden * len(wanted)) if wanted else None
        ints = lambda values: (ctypes.c_int32 * len(values))(*values)  # noqa: E731
        status = self._lib.specdec_forward(
            ctypes.byref(self.struct), rows, ints(lengths), ints(past), ints([t for tokens in new_tokens for t in tokens]),
            keys, values, ints(capacity), len(kept), ints(kept), ctypes.c_void_p(logits.data_ptr()),
            len(wanted), ints(wanted), ctypes.c_void_p(hidden.data_ptr()) if hidden is not None else None,
            ints([p for tree, n in zip(trees, lengths) for p in (tree if tree is not None else range(-1, n - 1))]) if trees else None,
        )  # fmt: skip
        if status:
            raise MemoryError("native forward pass: out of memory")
        for cache, n in zip(caches, lengths):
            cache.length += n
        per_row = [min(logits_for_last or n, n) for n in lengths]
        logits = list(logits.split(per_row))
        if not wanted:
            return logits
        return logits, list(hidden.split(lengths))
