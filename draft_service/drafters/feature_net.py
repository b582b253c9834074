"""The networks of the feature drafters: what they compute, for training and for serving alike.

Both read the target's own hidden states (its *features*: the output of its last decoder layer
before the final norm, or of several layers side by side) instead of guessing from tokens alone,
and read tokens off the target's final norm and LM head restricted to a draft vocabulary (FR-Spec).
The target's embedding, norm and head are borrowed at load time, frozen and never saved: the
shipped artefact holds only what was trained.

- `ChainNet` (EAGLE-style): at position t it fuses [feature f_t ; embedding of token t+1] with one
  linear layer and runs one decoder layer at the target's width over them (its own KV cache of
  earlier positions), predicting f_{t+1}, from which the next token is read. Within a round it
  drafts autoregressively from its own predicted features.
- `MultiTokenNet` (Medusa-style multi-token prediction): the same fused input at the last position
  goes through K residual heads at once, head k predicting token t+1+k; no attention, no loop.

Training (`distill.features.train`) unrolls `ChainNet` on its own predictions (EAGLE-3's
training-time test): step j's query at position t sees the step-0 keys of positions <= t - j and,
for i = 1..j, the step-i key at position t - j + i: the very keys a j-th draft step sees at
inference, where the cache holds true-feature entries up to the round's start and the chain's own
entries after it. `chain_mask` builds that mask; a test checks the unroll against the serving path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from specdec import weights
from specdec.lm import SequenceCache

CONFIG_FILE = "feature_drafter.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_KEY = "draft_token_ids"
CHAIN, MULTI_TOKEN = "chain", "multi-token"


@dataclass(frozen=True)
class FeatureNetConfig:
    kind: str  # CHAIN or MULTI_TOKEN
    hidden: int  # the target's hidden size
    feature_layers: tuple[int, ...]  # target decoder layers read (-1: the last), side by side
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    rope_theta: float
    num_heads: int = 0  # MULTI_TOKEN: tokens predicted per step
    target: str = "embedded"  # the target whose embedding and head it borrows, and whose features it reads

    @property
    def feature_width(self) -> int:
        return self.hidden * len(self.feature_layers)

    @classmethod
    def for_target(cls, kind: str, target_config, target: str, feature_layers=(-1,), num_heads: int = 0) -> "FeatureNetConfig":
        heads = target_config.num_attention_heads
        rope = getattr(target_config, "rope_parameters", None) or {}
        return cls(
            kind=kind,
            hidden=target_config.hidden_size,
            feature_layers=tuple(feature_layers),
            heads=heads,
            kv_heads=target_config.num_key_value_heads,
            head_dim=getattr(target_config, "head_dim", None) or target_config.hidden_size // heads,
            intermediate=target_config.intermediate_size,
            eps=target_config.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0))),
            num_heads=num_heads,
            target=target,
        )


class _Borrowed(nn.Module):
    """The target's embedding, final norm and head rows of the draft vocabulary: frozen buffers
    that are not part of the state dict."""

    def __init__(self, config: FeatureNetConfig, embedding: torch.Tensor, final_norm: torch.Tensor, head: torch.Tensor, vocabulary: torch.Tensor):
        super().__init__()
        self.config = config
        self.register_buffer("embedding", embedding.detach().float(), persistent=False)  # [V, H]
        self.register_buffer("final_norm", final_norm.detach().float(), persistent=False)  # [H]
        self.register_buffer("head", head.detach().float()[vocabulary], persistent=False)  # [V', H]
        self.register_buffer("vocabulary", vocabulary.long(), persistent=False)  # [V'] token ids of head rows
        # several target layers side by side are first reduced to the target's width (EAGLE-3),
        # the width of the net's own predictions, which later draft steps read instead
        self.reduce = nn.Linear(config.feature_width, config.hidden, bias=False) if len(config.feature_layers) > 1 else None
        self.fuse = nn.Linear(2 * config.hidden, config.hidden)
        self.format = "float32"
        self._kernels: dict[nn.Module, weights.Linear] = {}  # serving products in another format

    def use_format(self, format: str) -> None:
        """Serve with every product in weight format `format` (specdec/weights.py; the nets are
        memory-bound at one row, so int8 or bf16 weights roughly halve a step on CPUs with
        VNNI/AMX). Training keeps the float32 modules."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        self.format = format
        self._activation = weights.activation_dtype(format)
        if format == "float32":
            self._kernels = {}
            return
        self._kernels = {m: weights.make_linear(format, m.weight) for m in linears}
        self._kernels[self] = weights.make_linear(weights.HEAD_FORMAT.get(format, format), self.head)

    def product(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """module(x) in the serving format (float32 out)."""
        if not self._kernels:
            return module(x)
        y = self._kernels[module](x.to(self._activation)).float()
        return y + module.bias if module.bias is not None else y

    def reduced(self, features: torch.Tensor) -> torch.Tensor:
        """[N, W] target features -> [N, H], each layer's RMS-normalized first: the residual stream
        carries a few huge outlier channels (|x| ~ 4500 against an RMS of ~40 in SmolLM2's last
        layer) that would dominate the fused input."""
        c = self.config
        features = F.rms_norm(features.to(self.fuse.weight.dtype).unflatten(-1, (-1, c.hidden)), (c.hidden,), eps=c.eps).flatten(-2)
        return self.product(self.reduce, features) if self.reduce is not None else features

    def fused(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """[N, H] reduced target features (or the net's own predictions, normalized alike) and [N]
        tokens that follow them -> [N, H]."""
        return self.product(self.fuse, torch.cat([hidden, self.embedding[next_tokens]], -1))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] predicted features -> [N, V'] logits over the draft vocabulary."""
        normed = F.rms_norm(hidden, (hidden.shape[-1],), self.final_norm, self.config.eps)
        return self._kernels[self](normed.to(self._activation)).float() if self._kernels else normed @ self.head.T

    def target_log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """The target's own next-token log-probabilities [N, V'] from its last-layer features,
        restricted to the draft vocabulary and renormalized there (the training labels)."""
        last = features[..., -self.config.hidden :].float()
        return torch.log_softmax(self.logits(last), -1)

    def save(self, directory: Path, dtype=torch.bfloat16) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        tensors[VOCAB_KEY] = self.vocabulary.to(torch.int32).contiguous()
        save_file(tensors, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")


class ChainNet(_Borrowed):
    def __init__(self, config, embedding, final_norm, head, vocabulary):
        super().__init__(config, embedding, final_norm, head, vocabulary)
        h, q, kv = config.hidden, config.heads * config.head_dim, config.kv_heads * config.head_dim
        self.input_norm = nn.Parameter(torch.ones(h))
        self.qkv = nn.Linear(h, q + 2 * kv, bias=False)
        self.out = nn.Linear(q, h, bias=False)
        self.post_norm = nn.Parameter(torch.ones(h))
        self.gate_up = nn.Linear(h, 2 * config.intermediate, bias=False)
        self.down = nn.Linear(config.intermediate, h, bias=False)
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [head_dim / 2]

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.outer(positions.float(), self.inv_freq)  # [N, head_dim / 2]
        return angles.cos().repeat(1, 2)[:, None], torch.cat([-angles.sin(), angles.sin()], -1)[:, None]  # [N, 1, d]

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """[N, H] -> rotated queries [N, heads, d], rotated keys and values [N, kv, d]."""
        c = self.config
        h = self.product(self.qkv, F.rms_norm(x, (c.hidden,), self.input_norm, c.eps))
        cos, sin = self._rope(positions)
        q, k, v = h.split([c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim], -1)
        q, k = (t.view(len(x), -1, c.head_dim) for t in (q, k))
        q, k = (t * cos + t.roll(c.head_dim // 2, -1) * sin for t in (q, k))
        return q, k, v.view(len(x), c.kv_heads, c.head_dim)

    def _finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual attention output [N, heads x d], then the MLP: the predicted features [N, H]."""
        x = x + self.product(self.out, attended)
        gate, up = self.product(self.gate_up, F.rms_norm(x, (self.config.hidden,), self.post_norm, self.config.eps)).chunk(2, -1)
        return x + self.product(self.down, F.silu(gate) * up)

    def unrolled(self, features: torch.Tensor, next_tokens: torch.Tensor, steps: int, from_row: int = 0) -> list[torch.Tensor]:
        """Training: `steps` chained passes over one sequence. features [T, W] (f_0..f_{T-1}),
        next_tokens [T] (x_1..x_T). Returns per step j the prediction of f_{t+1} at each position t
        after j steps on its own predictions: [T, H] for step 0; steps j >= 1 run on rows from_row..
        only ([T - from_row, H]), which is exact for rows from from_row + j on (earlier ones read
        chain inputs that were not computed: leave them out of the loss, as rows t < j)."""
        length = len(features)
        positions = torch.arange(length, device=features.device)
        x = self.fused(self.reduced(features), next_tokens)  # [T, H]
        q, k, v = self._qkv(x, positions)
        keys, values = [k[from_row:]], [v[from_row:]]  # the chain's keys, rows from_row..
        true_keys, true_values = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # step 0's, every row
        predicted = self._finish(x, self._attend(q, true_keys, true_values, chain_mask(length, 0, device=x.device)))
        outputs = [predicted]
        previous = predicted[max(from_row - 1, 0) : length - 1]  # the prediction at t - 1 for rows t = from_row.. (row 0 reads its own)
        previous = torch.cat([predicted[:1], previous]) if from_row == 0 else previous
        for j in range(1, steps):
            x = self.fused(own_input(previous, self.config.eps), next_tokens[from_row:])  # [T - from_row, H]
            q, k, v = self._qkv(x, positions[from_row:])
            keys.append(k)
            values.append(v)
            chain_keys = torch.cat(keys[1:]).transpose(0, 1)[None]
            chain_values = torch.cat(values[1:]).transpose(0, 1)[None]
            mask = chain_mask(length, j, from_row, x.device)  # [T - from_row, T + j (T - from_row)]
            attended = self._attend(q, torch.cat([true_keys, chain_keys], 2), torch.cat([true_values, chain_values], 2), mask)
            predicted = self._finish(x, attended)
            outputs.append(predicted)
            previous = torch.cat([predicted[:1], predicted[:-1]])  # position t reads the prediction made at t - 1
        return outputs

    @staticmethod
    def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Queries [N, heads, d] over keys and values [1, kv, S, d] where mask [N, S] allows -> [N, heads x d]."""
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask, enable_gqa=True)  # [1, heads, N, d]
        return out[0].transpose(0, 1).reshape(len(q), -1)

    @torch.inference_mode()
    def extend(self, caches: list[SequenceCache], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Serving: append fused inputs [n_i, H] to each session's cache (projections packed, attention
        per session); per row the predicted features [n_i, H]."""
        lengths = [len(x) for x in inputs]
        x = torch.cat(inputs)
        positions = torch.tensor([c.length + i for c, n in zip(caches, lengths) for i in range(n)], device=x.device)
        q, k, v = self._qkv(x, positions)
        attended, start = [], 0
        for cache, n in zip(caches, lengths):
            rows = slice(start, start + n)
            past = cache.length
            keys, values = cache.write(0, k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None])  # [1, kv, past + n, d]
            cache.length += n
            mask = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(q[rows].transpose(0, 1)[None], keys, values, attn_mask=mask, enable_gqa=True)
            attended.append(out[0].transpose(0, 1).reshape(n, -1))
            start += n
        return list(self._finish(x, torch.cat(attended)).split(lengths))


def own_input(predicted: torch.Tensor, eps: float) -> torch.Tensor:
    """A predicted feature [N, H] as the next draft step's input, normalized like target features."""
    return F.rms_norm(predicted, (predicted.shape[-1],), eps=eps)


def chain_mask(length: int, step: int, from_row: int = 0, device=None) -> torch.Tensor:
    """Which keys the step-`step` queries at positions from_row..length-1 see: [T - from_row,
    T + step (T - from_row)] bool over step 0's keys (every position) and then those of steps
    1..step (positions from_row..). Step 0 is the causal mask."""
    t = torch.arange(from_row if step else 0, length, device=device)[:, None]  # query positions
    blocks = [torch.arange(length, device=device)[None, :] <= t - step]  # true-feature keys up to the chain's start
    if not step:
        return blocks[0]
    chain = torch.arange(from_row, length, device=device)[None, :]
    blocks += [chain == t - step + i for i in range(1, step + 1)]  # the chain's own keys
    return torch.cat(blocks, 1)


class MultiTokenNet(_Borrowed):
    def __init__(self, config, embedding, final_norm, head, vocabulary):
        super().__init__(config, embedding, final_norm, head, vocabulary)
        h = config.hidden
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h)) for _ in range(config.num_heads))

    def predicted(self, features: torch.Tensor, next_tokens: torch.Tensor) -> list[torch.Tensor]:
        """[N, W] features f_t and [N] tokens x_{t+1} -> per head k (0-based) [N, H]: the
        prediction from which token x_{t+2+k} is read."""
        x = self.fused(self.reduced(features), next_tokens)
        return [x + self.product(second, F.silu(self.product(first, x))) for first, _, second in self.heads]


NETS = {CHAIN: ChainNet, MULTI_TOKEN: MultiTokenNet}


def build(config: FeatureNetConfig, target_model: torch.nn.Module, vocabulary: torch.Tensor) -> _Borrowed:
    """A fresh net borrowing `target_model`'s embedding, final norm and head."""
    base = target_model.model
    return NETS[config.kind](config, base.embed_tokens.weight, base.norm.weight, target_model.get_output_embeddings().weight, vocabulary)


def read_config(directory: Path) -> FeatureNetConfig:
    raw = json.loads((Path(directory) / CONFIG_FILE).read_text())
    return FeatureNetConfig(**{**raw, "feature_layers": tuple(raw["feature_layers"])})


def load(directory: Path, target_model: torch.nn.Module) -> _Borrowed:
    """A trained net from `directory` (see `_Borrowed.save`), on `target_model`'s embedding and head."""
    config = read_config(directory)
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    net = build(config, target_model, tensors.pop(VOCAB_KEY).long())
    net.load_state_dict({k: v.float() for k, v in tensors.items()})
    return net.eval()
