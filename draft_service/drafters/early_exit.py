"""Self-speculative early exit on a draft node: the target's own first L layers and a trained exit.

The draft is the target cut after decoder layer L, followed by one trained decoder layer and a
trained final norm (the exit), then the target's own head restricted to a draft vocabulary
(FR-Spec). Untrained, the final norm and head read at layer L agree with the full model rarely (see
docs/drafts.md); the exit layer is distilled from the target (`python -m distill.early_exit`).

Assembled, the draft is an ordinary Llama model of L + 1 layers, so it is served by `ModelDrafter`
in any weight format the machine runs fastest (the native Q4_1 path included) and can be the
second stage of a staged drafter. A shipped exit holds only what was trained (one layer, a norm,
the vocabulary) and borrows the rest from the target at load time (`--feature-target`, by default
the target it was trained on).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from specdec import lm
from specdec.models import EMBEDDED, LoadedModel, resolve
from specdec.weights import FORMATS

CONFIG_FILE = "early_exit.json"
WEIGHTS_FILE = "exit.safetensors"
VOCAB_KEY = "token_ids"
SPEC_PREFIX = "early-exit:"


def shipped_name(layers: int) -> str:
    return f"smollm2-exit-l{layers}"


def directory_of(model: str) -> Path | None:
    """The exit's directory for `early-exit:L` (the shipped one) or a directory holding an exit;
    None for any other model."""
    if model.startswith(SPEC_PREFIX):
        layers = model[len(SPEC_PREFIX) :]
        if not layers.isdigit():
            raise ValueError(f"an early exit is 'early-exit:L' with L the target layers it runs, not {model!r}")
        path = Path(resolve(shipped_name(int(layers))))
        if not (path / CONFIG_FILE).is_file():
            raise ValueError(f"no early exit after {layers} layers is shipped (train one: python -m distill.early_exit)")
        return path
    if model == EMBEDDED or not (Path(resolve(model)) / CONFIG_FILE).is_file():
        return None
    return Path(resolve(model))


@dataclass(frozen=True)
class ExitConfig:
    target: str  # the model whose first `layers` layers, embedding and head the exit uses
    layers: int  # L: target decoder layers run before the exit layer


class ExitNet(torch.nn.Module):
    """The trained part: one decoder layer and a final norm, at the target's width, over the
    target's layer-L hidden states (during training, recorded ones: `forward`); the head rows are
    the target's for the draft vocabulary (a buffer, not saved)."""

    def __init__(self, config: ExitConfig, target: torch.nn.Module, vocabulary: torch.Tensor):
        super().__init__()
        self.config = config
        body_config = copy.deepcopy(target.config)
        body_config.num_hidden_layers, body_config.vocab_size, body_config.pad_token_id = 1, 1, None
        if getattr(body_config, "layer_types", None):
            body_config.layer_types = body_config.layer_types[:1]
        self.body = LlamaModel(body_config)  # its embedding (one row) is never used: inputs are hidden states
        self.body.requires_grad_(True)
        self.body.embed_tokens.requires_grad_(False)
        self.vocabulary = vocabulary
        self.register_buffer("head", target.get_output_embeddings().weight.detach()[vocabulary].clone(), persistent=False)  # [V', H]
        self.register_buffer("target_norm", target.model.norm.weight.detach().clone(), persistent=False)
        self.eps = target.config.rms_norm_eps

    @classmethod
    def initialized(cls, config: ExitConfig, target: torch.nn.Module, vocabulary: torch.Tensor) -> "ExitNet":
        """An exit that starts as the target's layer L + 1 and its final norm (the untrained exit
        after L + 1 layers)."""
        net = cls(config, target, vocabulary)
        net.body.layers[0].load_state_dict(target.model.layers[config.layers].state_dict())
        net.body.norm.load_state_dict(target.model.norm.state_dict())
        return net

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, H] of a sequence's positions 0..T-1 after L target layers -> logits
        [T, V'] over the draft vocabulary for the token after each."""
        positions = torch.arange(hidden.shape[0])[None]
        return self.body(inputs_embeds=hidden[None], position_ids=positions).last_hidden_state[0] @ self.head.T

    def target_log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """The target's own next-token log-probabilities [N, V'] from its last-layer features (the
        last H columns), restricted to the draft vocabulary and renormalized (the labels)."""
        last = features[..., -self.head.shape[1] :].float()
        normed = torch.nn.functional.rms_norm(last, (last.shape[-1],), self.target_norm, self.eps)
        return torch.log_softmax(normed @ self.head.T, -1)

    def save(self, directory: Path, dtype=torch.bfloat16) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in self.body.state_dict().items() if k.startswith(("layers.0.", "norm."))}
        tensors[VOCAB_KEY] = self.vocabulary.to(torch.int32).contiguous()
        save_file(tensors, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")


def read_config(directory: Path) -> ExitConfig:
    return ExitConfig(**json.loads((Path(directory) / CONFIG_FILE).read_text()))


def load_exit(directory: Path, model_config, layer_index: int) -> tuple[LlamaDecoderLayer, torch.Tensor, torch.Tensor]:
    """An exit's trained decoder layer (as layer `layer_index` of a model with `model_config`),
    its final norm's weight and its draft vocabulary, in float32."""
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    layer = LlamaDecoderLayer(model_config, layer_idx=layer_index)
    layer.load_state_dict({k.removeprefix("layers.0."): v.float() for k, v in tensors.items() if k.startswith("layers.0.")})
    layer.requires_grad_(False)
    return layer, tensors["norm.weight"].float(), tensors[VOCAB_KEY].long()


def assemble(directory: Path, target: LoadedModel, dtype: str = "auto") -> tuple[LoadedModel, torch.Tensor]:
    """The draft model (the target's first L layers, the exit layer and norm; the target's head)
    and its draft vocabulary. `target` is taken apart: its later layers are dropped."""
    config = read_config(directory)
    model = target.model
    if config.layers >= len(model.model.layers):
        raise ValueError(f"an exit after {config.layers} layers needs a target with more than {config.layers}")
    exit_layer, norm, vocabulary = load_exit(directory, model.config, config.layers)
    model.model.layers = torch.nn.ModuleList([*model.model.layers[: config.layers], exit_layer.to(target.device)])
    model.model.norm.weight.data.copy_(norm)
    model.config.num_hidden_layers = config.layers + 1
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[: config.layers + 1]
    model.requires_grad_(False)
    if dtype in FORMATS:
        lm.use_format(model, dtype)
    loaded = LoadedModel(model, target.tokenizer, Path(directory).name, target.device, target.dtype, target.eos_token_ids,
                         target.max_context, dtype)
    return loaded, vocabulary
