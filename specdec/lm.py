"""Running a causal LM over many sequences that each own a KV cache of a different length.

A `SequenceCache` holds one sequence's keys and values in per-layer buffers that grow by doubling:
appending a token writes into the buffer instead of concatenating (torch.cat would copy the whole
cache on every step, which dominated a decoding step at 1,000 tokens of context on CPU), and
rolling back is just a shorter length.

`forward` extends several caches in one batched forward pass. Llama-architecture models (the
embedded target, our drafts) run through `lean_llama`, which packs the rows: projections and MLPs
over all new tokens at once, attention per row over its own buffer, so ragged batches cost neither
padding nor cache copies. Other architectures run through transformers: one sequence with a
`Cache` whose layers write into the session's buffers, a batch (`forward_padded`) with the caches
copied, left-padded, into a `DynamicCache`, the new tokens right-padded, an attention mask with
zeros on the padding and explicit `position_ids` per row. bench/batching.py measures both.
"""

from __future__ import annotations

import fcntl
import logging
import time
import weakref
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from specdec import trees, weights
from specdec.lean_llama import LeanLlama, format_of, supports_lean_path
from specdec.native import model as native_model

log = logging.getLogger(__name__)


@dataclass
class SequenceCache:
    """Keys and values of one sequence: per layer a [1, heads, capacity, head_dim] buffer, of which
    the first `length` positions are valid."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0
    # the buffers' bytes, kept as they are made: the session store's budget check reads every
    # session's size before each batch, and summing 2 x layers buffers per session costs ~30 us
    nbytes: int = field(default=0, init=False)

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions; later appends overwrite the rest."""
        self.length = min(self.length, length)

    @torch.inference_mode()
    def keep_path(self, start: int, kept: list[int]) -> None:
        """After the first `start` positions, keep the entries at start + kept[i] (ascending), moved
        to start + i in every layer: a verified tree's accepted path, compacted in place."""
        if kept != list(range(len(kept))):
            source = torch.tensor(kept) + start
            for buffer in self.keys + self.values:
                buffer[:, :, start : start + len(kept)] = buffer[:, :, source]
        self.length = start + len(kept)

    def layer(self, index: int, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's valid keys and values: [1, heads, end or length, head_dim]."""
        end = self.length if end is None else end
        return self.keys[index][:, :, :end], self.values[index][:, :, :end]

    def write(self, index: int, keys: torch.Tensor, values: torch.Tensor, at: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [1, heads, n, head_dim] new keys and values of one layer at position `at` (default:
        after the valid prefix); return that layer's views up to the new end. `length` moves once
        all layers are written. A self-drafting target writes its first layers' entries for draft
        tokens past `length` (target_service/self_draft.py); they stay until overwritten."""
        at = self.length if at is None else at
        end = at + keys.shape[2]
        if index == len(self.keys):
            self.keys.append(keys.new_empty(1, keys.shape[1], max(end, 16), keys.shape[3]))
            self.values.append(values.new_empty(1, values.shape[1], max(end, 16), values.shape[3]))
            self.nbytes += _size(self.keys[-1]) + _size(self.values[-1])
        elif end > self.keys[index].shape[2]:
            self._grow(index, end)
        self.keys[index][:, :, at:end] = keys
        self.values[index][:, :, at:end] = values
        return self.layer(index, end)

    def reserve(self, layers: int, heads: int, head_dim: int, needed: int, dtype: torch.dtype) -> None:
        """Room for `needed` positions in every layer, all layers at one capacity (the native
        forward pass writes the new keys and values in place, see specdec/native/model.py)."""
        if not self.keys:
            capacity = max(needed, 16)
            self.keys = [torch.empty(1, heads, capacity, head_dim, dtype=dtype) for _ in range(layers)]
            self.values = [torch.empty(1, heads, capacity, head_dim, dtype=dtype) for _ in range(layers)]
            self.nbytes = sum(map(_size, self.keys + self.values))
        elif needed > self.keys[0].shape[2]:
            for index in range(layers):
                self._grow(index, needed)

    def _grow(self, index: int, needed: int) -> None:
        """Doubles (at least) one layer's buffers, keeping what they hold (entries past `length`
        included: a self-drafting target's)."""
        for buffers in (self.keys, self.values):
            buffer = buffers[index]
            bigger = buffer.new_empty(*buffer.shape[:2], max(needed, 2 * buffer.shape[2]), buffer.shape[3])
            bigger[:, :, : buffer.shape[2]] = buffer
            buffers[index] = bigger
            self.nbytes += _size(bigger) - _size(buffer)


def _size(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class _SessionLayer(DynamicLayer):
    """A cache layer that appends into a SequenceCache's buffer (no copy of the past)."""

    def __init__(self, store: SequenceCache, index: int):
        super().__init__()
        self.store, self.index = store, index
        if index < len(store.keys) and store.length:
            self.keys, self.values = store.layer(index)
            self.dtype, self.device = self.keys.dtype, self.keys.device
            self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = self.store.write(self.index, key_states, value_states)
        return self.keys, self.values


def num_layers(model: torch.nn.Module) -> int:
    return model.config.get_text_config().num_hidden_layers


@torch.inference_mode()
def forward(
    model: torch.nn.Module,
    caches: list[SequenceCache],
    new_tokens: list[list[int]],
    logits_for_last: int | None = None,
    features: tuple[int, ...] = (),
    parents: list[list[int] | None] | None = None,
):
    """Append `new_tokens[i]` to `caches[i]` for every i in one forward pass; return their logits.

    Returns per row a float32 tensor [n_i, V] of logits at the new positions (only the last
    `logits_for_last` of them when given, e.g. 1 for a prefill). The caches are updated in place.
    With `features` (Llama architectures only), returns (logits, features): see LeanLlama.forward.
    `parents[i]` (not None) makes row i a tree (specdec/trees.py: per token its parent among the
    row's tokens, -1 for the first): each token sees the cache and its ancestors, at position
    cache length + depth; the cache then holds the row in token order, for `keep_path`.
    """
    lean = _lean_path(model)
    if lean is not None:
        return lean.forward(caches, new_tokens, logits_for_last, features, parents)
    if features:
        raise ValueError("target features need a Llama-architecture model (the lean path)")
    device = next(model.parameters()).device
    if parents is not None and any(tree is not None for tree in parents):
        return [forward_transformers(model, cache, tokens, logits_for_last, device, tree) for cache, tokens, tree in zip(caches, new_tokens, parents)]
    if len(caches) == 1:
        return [forward_transformers(model, caches[0], new_tokens[0], logits_for_last, device)]
    return forward_padded(model, caches, new_tokens, logits_for_last)


@torch.inference_mode()
def forward_padded(
    model: torch.nn.Module,
    caches: list[SequenceCache],
    new_tokens: list[list[int]],
    logits_for_last: int | None = None,
) -> list[torch.Tensor]:
    """`forward` for any architecture through transformers: the caches are copied, left-padded,
    into one DynamicCache and the new tokens right-padded, so every row computes its padding too."""
    device = next(model.parameters()).device
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
    for row, (seq_cache, new_length) in enumerate(zip(caches, new_lengths)):
        new = slice(past, past + new_length)
        for index, layer in enumerate(output.past_key_values.layers):
            seq_cache.write(index, layer.keys[row : row + 1, :, new], layer.values[row : row + 1, :, new])
        seq_cache.length += new_length
        first = new_length - logits_for_last if logits_for_last else 0
        results.append(output.logits[row, first:new_length].float())
    return results


_lean_paths: "weakref.WeakKeyDictionary[torch.nn.Module, LeanLlama]" = weakref.WeakKeyDictionary()


def _lean_path(model: torch.nn.Module) -> LeanLlama | None:
    """The model's lean path, rebuilt (in the same weight format) when its head was replaced
    (draft vocabulary)."""
    if not supports_lean_path(model):
        return None
    lean = _lean_paths.get(model)
    if lean is None or lean.head_source is not model.get_output_embeddings().weight:
        lean = _lean_paths[model] = path_for(model, lean.format if lean else format_of(model))
    return lean


def lean_path(model: torch.nn.Module) -> LeanLlama | None:
    """The model's lean path when its forward passes run through one (not the native formats)."""
    path = _lean_path(model)
    return path if isinstance(path, LeanLlama) else None


def path_for(model: torch.nn.Module, format: str):
    """The forward path that runs `format`: our native one for GGUF block formats, else the lean one
    (both: forward(caches, new_tokens, logits_for_last, features))."""
    if format in weights.NATIVE_FORMATS:
        ready, why = native_model.supports(model)
        if not ready:
            raise ValueError(f"weight format {format} is not available for this model: {why}")
        return native_model.NativeLlama(model, format)
    return LeanLlama(model, format)


def use_format(model: torch.nn.Module, format: str) -> None:
    """Run the model's forward passes with its weights in `format` (specdec/weights.py); formats
    other than its own dtype need the lean path (Llama architectures)."""
    if not supports_lean_path(model):
        if format != weight_format(model):
            raise ValueError(f"weight format {format} needs a Llama-architecture model; this one runs as {weight_format(model)}")
        return
    _lean_paths[model] = path_for(model, format)


def weight_format(model: torch.nn.Module) -> str:
    """The weight format the model's forward passes run in."""
    lean = _lean_path(model)
    return lean.format if lean is not None else format_of(model)


def forward_transformers(model, cache: SequenceCache, tokens: list[int], logits_for_last: int | None, device, parents=None) -> torch.Tensor:
    """One sequence through the model's own forward (any architecture); float32 logits [n, V].
    A tree (`parents`) goes in with a 4D mask (each token sees the cache and its ancestors) and
    positions by depth."""
    start = cache.length
    mask, offsets = None, torch.arange(len(tokens))
    if parents is not None:
        offsets = torch.tensor(trees.depths(parents)) - 1
        sees = torch.zeros(len(tokens), len(tokens), dtype=torch.bool)
        for node in range(len(tokens)):
            sees[node, trees.path_to(parents, node)] = True
        sees = torch.cat([torch.ones(len(tokens), start, dtype=torch.bool), sees], 1)  # [n, start + n]
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, torch.finfo(dtype).min)[None, None].to(device)
    output = model(
        input_ids=torch.tensor([tokens], device=device),
        attention_mask=mask,
        position_ids=(start + offsets).to(device).unsqueeze(0),
        past_key_values=Cache(layers=[_SessionLayer(cache, i) for i in range(num_layers(model))]),
        use_cache=True,
        logits_to_keep=logits_for_last or 0,
    )
    cache.length += len(tokens)
    return output.logits[0].float()


def _left_padded(caches: list[SequenceCache], length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the caches stacked into [B, heads, length, head_dim], each left-padded with zeros."""
    padded = []
    filled = next(c for c in caches if c.length)
    for layer in range(len(filled.keys)):
        template = filled.keys[layer]
        keys = template.new_zeros(len(caches), template.shape[1], length, template.shape[3])
        values = torch.zeros_like(keys)
        for row, cache in enumerate(caches):
            if cache.length:
                k, v = cache.layer(layer)
                keys[row, :, length - cache.length :] = k[0]
                values[row, :, length - cache.length :] = v[0]
        padded.append((keys, values))
    return padded


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of keys and values one token adds to a sequence's cache."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = weights.activation_dtype(weight_format(model)).itemsize
    return 2 * config.num_hidden_layers * heads * head_dim * element


def forward_seconds(model: torch.nn.Module, tokens: int, context: int = 64, repeats: int = 5, rows: int = 1) -> float:
    """The fastest of `repeats` forward passes scoring `tokens` new tokens in each of `rows`
    sequences over `context` cached tokens each (the caches are rolled back after every pass)."""
    caches = [SequenceCache() for _ in range(rows)]
    forward(model, caches, [[row % 7 + 1] * context for row in range(rows)], logits_for_last=1)
    fastest = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        forward(model, caches, [[1] * tokens for _ in range(rows)])
        fastest = min(fastest, time.perf_counter() - started)
        for cache in caches:
            cache.truncate(context)
    return fastest


def choose_format(loaded, max_k: int = 4, lean_only: bool = False) -> weights.FormatChoice:
    """Resolve `loaded.weight_format`: "auto" times each candidate format on this machine (a
    single step and verifies of up to max_k + 1 tokens, see weights.choose_format) and keeps the
    fastest; an explicit format or the parameters' own dtype is kept as it is. `lean_only`: torch
    formats only (a self-drafting target runs layer ranges, which the native formats do not)."""
    model = loaded.model
    if loaded.weight_format != weights.AUTO:
        choice = weights.FormatChoice(weight_format(model), "as configured (--dtype)", {})
    else:
        choice = _timed_choice(loaded, max_k, lean_only)
    if batch_invariant(model):
        return replace(choice, reason=choice.reason + "; batch-invariant")
    log.info("%s in %s is not batch-invariant: greedy speculation may part from target-only decoding at near-ties",
                loaded.name, choice.format)
    return replace(choice, reason=choice.reason + "; not batch-invariant")


def _timed_choice(loaded, max_k: int, lean_only: bool = False) -> weights.FormatChoice:
    """auto's choice for this model on this machine: timed once, then kept in the cache, so that a
    restarted service (or a second replica on the same machine) runs the same format and gives
    the same output, instead of a fresh timing that noise could tip the other way. Replicas that
    start together take turns (a lock beside the cache): the first times, the others read its
    choice, where two timings at once would disturb each other and could disagree."""
    from specdec.models import cache_dir

    key = weights.machine_key(loaded.name, loaded.model.config.to_json_string(), loaded.device, max_k) + ("/lean" if lean_only else "")
    store = cache_dir() / "weight-formats.json"
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        return _cached_or_timed(loaded, max_k, lean_only, key, store)


def _cached_or_timed(loaded, max_k: int, lean_only: bool, key: str, store) -> weights.FormatChoice:
    model = loaded.model
    known = weights.load_choices(store)
    if key in known:
        use_format(model, known[key].format)
        return replace(known[key], reason=known[key].reason + f" (timed earlier on this machine; cached in {store})")
    formats = weights.candidates(loaded.device) if supports_lean_path(model) else (format_of(model),)
    formats = tuple(f for f in formats if weights.supported(f, model.get_output_embeddings().weight))
    if loaded.device.type == "cpu" and native_model.supports(model)[0] and not lean_only:
        formats += weights.NATIVE_FORMATS

    def timed(format: str, tokens: int) -> float:
        if weight_format(model) != format:
            use_format(model, format)
        return forward_seconds(model, tokens, repeats=3)

    choice = weights.choose_format(formats, timed, max_k)
    use_format(model, choice.format)
    weights.save_choice(store, key, choice)
    return choice


def batch_invariant(model: torch.nn.Module, context: int = 40, tokens: int = 5) -> bool:
    """Whether `tokens` tokens scored in one pass get the very logits they get one at a time (what
    makes greedy speculation equal target-only decoding bit for bit; see lean_llama)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = [(7 * i + 3) % vocab for i in range(context + tokens)]
    together, alone = SequenceCache(), SequenceCache()
    forward(model, [together], [ids[:context]], logits_for_last=1)
    forward(model, [alone], [ids[:context]], logits_for_last=1)
    chunk = forward(model, [together], [ids[context:]])[0]
    singles = torch.cat([forward(model, [alone], [[token]])[0] for token in ids[context:]])
    return torch.equal(chunk, singles)
