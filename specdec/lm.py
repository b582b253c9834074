"""Running a causal LM over many sequences that each own a KV cache of a different length.

A `SequenceCache` holds one sequence's per-layer keys and values. `forward` extends several of them
in one batched forward pass: caches are left-padded to a common length, new tokens right-padded,
and an attention mask (zeros on the padding) plus explicit `position_ids` per row make every row
compute what it would compute alone. Rolling back is `truncate`.

Plain transformers 5.x only (DynamicCache built from tensors); no custom kernels. Copying the
caches into a padded batch costs memory traffic every call; a preallocated per-slot cache is the
optimization to measure against it (batched-serving issue).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class SequenceCache:
    """Keys and values of one sequence: per layer a pair of [1, heads, length, head_dim] tensors."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[-2] if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions (views: no copy)."""
        if length < self.length:
            self.layers = [(k[:, :, :length], v[:, :, :length]) for k, v in self.layers]


@torch.inference_mode()
def forward(
    model: torch.nn.Module,
    caches: list[SequenceCache],
    new_tokens: list[list[int]],
    logits_for_last: int | None = None,
) -> list[torch.Tensor]:
    """Append `new_tokens[i]` to `caches[i]` for every i in one forward pass; return their logits.

    Returns per row a float32 tensor [n_i, V] of logits at the new positions (only the last
    `logits_for_last` of them when given, e.g. 1 for a prefill). The caches are updated in place.
    """
    device = next(model.parameters()).device
    if len(caches) == 1:
        return [_forward_one(model, caches[0], new_tokens[0], logits_for_last, device)]

    past_lengths = [c.length for c in caches]
    new_lengths = [len(t) for t in new_tokens]
    past, width = max(past_lengths), max(new_lengths)
    batch = len(caches)

    input_ids = torch.zeros(batch, width, dtype=torch.long)  # right-padded; padding is masked out
    mask = torch.zeros(batch, past + width, dtype=torch.long)  # [B, past + width]
    for row, (tokens, past_length) in enumerate(zip(new_tokens, past_lengths)):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, past - past_length : past + len(tokens)] = 1
    positions = torch.tensor(past_lengths).unsqueeze(1) + torch.arange(width).unsqueeze(0)  # [B, width]

    cache = DynamicCache(ddp_cache_data=_left_padded(caches, past) if past else None)
    output = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        past_key_values=cache,
        use_cache=True,
    )
    results = []
    for row, (seq_cache, past_length, new_length) in enumerate(zip(caches, past_lengths, new_lengths)):
        keep = slice(past - past_length, past + new_length)
        seq_cache.layers = [
            (layer.keys[row : row + 1, :, keep], layer.values[row : row + 1, :, keep]) for layer in output.past_key_values.layers
        ]
        first = new_length - logits_for_last if logits_for_last else 0
        results.append(output.logits[row, first:new_length].float())
    return results


def _forward_one(model, cache: SequenceCache, tokens: list[int], logits_for_last: int | None, device) -> torch.Tensor:
    start = cache.length
    output = model(
        input_ids=torch.tensor([tokens], device=device),
        position_ids=torch.arange(start, start + len(tokens), device=device).unsqueeze(0),
        past_key_values=DynamicCache(ddp_cache_data=cache.layers or None),
        use_cache=True,
        logits_to_keep=logits_for_last or 0,
    )
    cache.layers = [(layer.keys, layer.values) for layer in output.past_key_values.layers]
    return output.logits[0].float()


def _left_padded(caches: list[SequenceCache], length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the caches stacked into [B, heads, length, head_dim], each left-padded with zeros."""
    padded = []
    for layer in range(len(next(c for c in caches if c.layers).layers)):
        template = next(c for c in caches if c.layers).layers[layer][0]
        keys = template.new_zeros(len(caches), template.shape[1], length, template.shape[3])
        values = torch.zeros_like(keys)
        for row, cache in enumerate(caches):
            if cache.layers:
                k, v = cache.layers[layer]
                keys[row, :, length - k.shape[-2] :] = k[0]
                values[row, :, length - v.shape[-2] :] = v[0]
        padded.append((keys, values))
    return padded


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of keys and values one token adds to a sequence's cache."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * element
