"""A lean forward pass for a batch of sequences of a Llama-architecture model (Llama, SmolLM2 and
our distilled drafts), over the same `SequenceCache` buffers as the Hugging Face path.

Why: transformers' module stack adds per-call overhead (module calls, cache objects, mask
construction) that matters for small models on CPU. This path does the same arithmetic with a few
tensor operations per layer (fused QKV and gate/up projections), with the model's weights in the
weight format chosen for the processor (specdec/weights.py: float32, prepacked bf16, int8, int4).
Measured single-thread on the 2-core dev machine (fp32): the embedded target's one-token step went
from 118 to 82 ms and the 6 x 288 draft's from 10.3-13.4 to 9.6-11.3 ms. A batch is packed (see
`LeanLlama.forward`); tests check that this path, transformers' and the padded batch give the same
logits.

Attention runs per query over exactly the keys that query sees, the same call a one-token step
makes. A masked attention over the whole chunk would reduce over a longer key row (masked entries
included), whose vectorized tail differs from the shorter row's, and the logits of a (K+1)-token
verify would then differ from those of single steps by up to 0.6 in bf16, enough to flip the
argmax at near-ties. With batch-invariant products (bf16, int8, int4) every token's logits are the
same bits whether it is scored alone, in a verify, or beside other sessions' rows. Rows of more
than PER_QUERY_MAX tokens (prompt prefills, which every mode runs alike) take one masked call.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specdec import trees, weights
from specdec.weights import Linear

# Rows of up to this many new tokens (steps and verifies: K + 1 <= 17) attend per query.
PER_QUERY_MAX = 32


@dataclass
class _Layer:
    input_norm: torch.Tensor  # [H]
    qkv: Linear  # H -> (heads + 2 kv_heads) * head_dim
    qkv_bias: torch.Tensor | None
    out: Linear  # heads * head_dim -> H
    post_norm: torch.Tensor  # [H]
    gate_up: Linear  # H -> 2 I
    down: Linear  # I -> H


def supports_lean_path(model: torch.nn.Module) -> bool:
    """Llama-family decoders with SiLU MLPs and no MLP bias: the architecture this path implements."""
    config = model.config
    return (
        getattr(config, "model_type", None) == "llama"
        and getattr(config, "hidden_act", None) == "silu"
        and not getattr(config, "mlp_bias", False)
        and hasattr(getattr(model, "model", None), "rotary_emb")
    )


def format_of(model: torch.nn.Module) -> str:
    """The weight format that keeps a model's own parameter dtype."""
    dtype = next(model.parameters()).dtype
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


class LeanLlama:
    def __init__(self, model: torch.nn.Module, format: str | None = None):
        config = model.config
        base = model.model
        self.format = format or format_of(model)
        self.dtype = weights.activation_dtype(self.format)
        make = lambda weight: weights.make_linear(self.format, weight)  # noqa: E731
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.embedding = base.embed_tokens.weight.to(self.dtype)  # [V, H]
        self.final_norm = base.norm.weight.to(self.dtype)
        self.head_source = model.get_output_embeddings().weight  # [V', H] (V' < V with a reduced draft head)
        self.head = weights.make_linear(weights.HEAD_FORMAT.get(self.format, self.format), self.head_source)
        self.inv_freq = base.rotary_emb.inv_freq  # [head_dim / 2]
        self.rope_scale = base.rotary_emb.attention_scaling
        self.layers = []
        for layer in base.layers:
            attention, mlp = layer.self_attn, layer.mlp
            projections = (attention.q_proj, attention.k_proj, attention.v_proj)
            biases = [p.bias for p in projections]
            self.layers.append(
                _Layer(
                    input_norm=layer.input_layernorm.weight.to(self.dtype),
                    qkv=make(torch.cat([p.weight for p in projections])),
                    qkv_bias=torch.cat(biases).to(self.dtype) if biases[0] is not None else None,
                    out=make(attention.o_proj.weight),
                    post_norm=layer.post_attention_layernorm.weight.to(self.dtype),
                    gate_up=make(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                    down=make(mlp.down_proj.weight),
                )
            )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # one fused op (computed in float32 for bf16 inputs) instead of eight
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def _rope(self, positions: list[int], dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [N, 1, head_dim] for the given absolute positions, the sin's first half
        negated so that rotating is x * cos + roll(x, half) * sin."""
        positions = torch.tensor(positions, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq.float())  # [N, head_dim / 2]
        sin = angles.sin() * self.rope_scale
        cos = (angles.cos() * self.rope_scale).repeat(1, 2)  # [N, head_dim]
        return cos.to(dtype)[:, None], torch.cat([-sin, sin], -1).to(dtype)[:, None]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of x [N, heads, head_dim]: each half rotated against the other."""
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin

    @torch.inference_mode()
    def forward(
        self, caches: list, new_tokens: list[list[int]], logits_for_last: int | None = None, features: tuple[int, ...] = (), parents: list | None = None
    ):
        """Append `new_tokens[i]` to `caches[i]` for every i in one pass; per row float32 logits
        [n_i or logits_for_last, V']. With `features` (decoder layer indices, -1 the last), also
        per row those layers' outputs at every new position, side by side, [n_i, H x layers] in
        the activation dtype (what a feature drafter reads; the last layer's is taken before the
        final norm): returns (logits, features). `parents[i]` (None: a chain) makes row i a tree:
        per new token the index of its parent among them, -1 for the first (see `run_layers`).

        The rows are packed, not padded: the projections and MLPs run once over all N new tokens
        of the batch, and only attention runs per row, each over its own cache buffer in place. No
        padding is computed and no cache is copied, whatever the rows' lengths.
        """
        lengths = [len(tokens) for tokens in new_tokens]
        wanted = [index % len(self.layers) for index in features]
        x, kept = self.run_layers(self.embed(new_tokens), caches, lengths, [c.length for c in caches], range(len(self.layers)), wanted, parents)
        for cache, n in zip(caches, lengths):
            cache.length += n
        logits = self.logits(x, lengths, logits_for_last)
        if not features:
            return logits
        hidden = torch.cat([kept[index] for index in wanted], -1) if len(wanted) > 1 else kept[wanted[0]]  # [N, H x layers]
        return logits, list(hidden.split(lengths))

    @torch.inference_mode()
    def embed(self, new_tokens: list[list[int]]) -> torch.Tensor:
        """The rows' tokens packed into one [N, H] input."""
        flat = [token for tokens in new_tokens for token in tokens]
        return self.embedding[torch.tensor(flat, device=self.embedding.device)]

    @torch.inference_mode()
    def run_layers(
        self, x: torch.Tensor, caches: list, lengths: list[int], starts: list[int], indices, wanted: list[int] = (), parents: list | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run decoder layers `indices` (ascending) over packed hidden states x [N, H]: row i's
        lengths[i] positions start at starts[i], their keys and values are written there in each
        layer's cache, and each query sees that layer's keys up to itself. Caches' `length` is
        not moved (the caller does, once every layer holds the positions). Returns x after the
        last layer and, for the layers in `wanted`, their outputs.

        A tree row (parents[i] not None: per token its parent's index in the row, -1 for the
        first) puts each token at position start + its depth and lets it see the cache and its
        ancestors only. Its keys end up in token order like a chain's (SequenceCache.keep_path
        then keeps the accepted ones); while a token attends, its ancestors' keys are copied
        right after the cache, so its attention is the very call a chain (or one-token step)
        makes over the same keys, bit for bit."""
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        parents = parents or [None] * len(lengths)
        offsets = [range(n) if tree is None else [depth - 1 for depth in trees.depths(tree)] for n, tree in zip(lengths, parents)]
        positions = [start + offset for start, row in zip(starts, offsets) for offset in row]
        cos, sin = self._rope(positions, x.dtype)  # [N, 1, head_dim] each
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        total = bounds[-1]
        kept = {}
        for index in indices:
            layer = self.layers[index]
            h = layer.qkv(self._norm(x, layer.input_norm))  # [N, q + 2 kv]
            if layer.qkv_bias is not None:
                h = h + layer.qkv_bias
            # queries and keys rotated together: [N, heads + kv, d]
            qk = self._rotate(h[:, : q_size + kv_size].view(total, self.heads + self.kv_heads, self.head_dim), cos, sin)
            q, k = qk[:, : self.heads], qk[:, self.heads :]  # [N, heads, d], [N, kv, d]
            v = h[:, q_size + kv_size :].view(total, self.kv_heads, self.head_dim)  # [N, kv, d]
            attended = []
            for row, cache in enumerate(caches):
                rows = slice(bounds[row], bounds[row + 1])
                past = starts[row]
                keys, values = cache.write(index, k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None], past)  # [1, kv, past + n, d]
                queries = q[rows].transpose(0, 1)[None]  # [1, heads, n, d]
                if parents[row] is not None:
                    attended.append(self._attend_tree(cache, index, past, queries, keys[:, :, past:], values[:, :, past:], parents[row]))
                    continue
                if lengths[row] > PER_QUERY_MAX:  # query j sees the past and the new tokens up to j
                    mask = torch.ones(lengths[row], past + lengths[row], dtype=torch.bool, device=x.device).tril(past)
                    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, enable_gqa=True)
                    attended.append(out[0].transpose(0, 1).reshape(lengths[row], q_size))
                    continue
                for j in range(lengths[row]):
                    seen = past + j + 1
                    out = F.scaled_dot_product_attention(
                        queries[:, :, j : j + 1], keys[:, :, :seen], values[:, :, :seen], enable_gqa=True
                    )  # [1, heads, 1, d]
                    attended.append(out.view(1, q_size))
            x = x + layer.out(torch.cat(attended) if len(attended) > 1 else attended[0])
            gate, up = layer.gate_up(self._norm(x, layer.post_norm)).chunk(2, -1)  # [N, I] each
            x = x + layer.down(F.silu(gate) * up)
            if index in wanted:
                kept[index] = x
        return x, kept

    def _attend_tree(self, cache, index: int, past: int, queries, keys, values, parents: list[int]) -> torch.Tensor:
        """Attention of one tree row: queries [1, heads, n, d]; keys and values [1, kv, n, d] of its
        tokens in token order (copies, as written at `past`). Returns [n, heads x d]."""
        keys, values = keys.clone(), values.clone()
        out, written = [], []  # written: the path whose keys sit after the cache now
        for j in range(len(parents)):
            path = trees.path_to(parents, j)
            shared = next((i for i, (a, b) in enumerate(zip(path, written)) if a != b), min(len(path), len(written)))
            seen_keys, seen_values = cache.write(index, keys[:, :, path[shared:]], values[:, :, path[shared:]], past + shared)
            written = path
            attended = F.scaled_dot_product_attention(queries[:, :, j : j + 1], seen_keys, seen_values, enable_gqa=True)  # [1, heads, 1, d]
            out.append(attended.view(1, -1))
        cache.write(index, keys, values, past)  # token order, as a chain leaves it
        return torch.cat(out)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, lengths: list[int], logits_for_last: int | None = None) -> list[torch.Tensor]:
        """Per row float32 logits [n_i or logits_for_last, V'] from the last layer's packed output."""
        ends = list(itertools.accumulate(lengths))
        keep = [torch.arange(end - min(logits_for_last or n, n), end, device=x.device) for end, n in zip(ends, lengths)]
        logits = self.head(self._norm(x[torch.cat(keep)], self.final_norm)).float()  # [sum kept, V']
        return list(logits.split([len(rows) for rows in keep]))
