"""Training the feature drafters on the feature corpus.

Both nets learn the target's next-token distribution at response positions: forward KL(p || q),
p the target's own distribution read from its recorded features (restricted to the draft
vocabulary and renormalized, like q). The chain net is unrolled `unroll` steps on its own
predictions (training-time test, `ChainNet.unrolled`), step j's loss weighted by decay^j, so that
draft positions 2..K see at training the inputs they see at inference. Multi-token head k learns
the distribution k + 1 tokens ahead.

One sequence at a time (projections over its whole length; unrolled steps and logits only where
losses are), gradients accumulated to about `batch_tokens` response positions per optimizer step;
products in bfloat16 where the processor makes that faster (`fast_dtype`). Runs for `steps` or `time_budget_s`; checkpoints
(nets, optimizers, data position) every `checkpoint_every_s` and at the end; a rerun resumes.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from distill.features.corpus import FeatureExample, FeatureStore
from draft_service.drafters.feature_net import ChainNet, MultiTokenNet


@dataclass
class TrainSettings:
    steps: int
    time_budget_s: float  # 0: no limit
    batch_tokens: int
    learning_rate: float
    warmup_steps: int
    max_sequence: int
    unroll: int
    decay: float
    bfloat16: bool  # matrix products in bfloat16 (autocast), parameters and optimizer in float32
    checkpoint_every_s: float
    seed: int


@dataclass
class Trainee:
    name: str
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    losses: list[float] = field(default_factory=list)  # recent per-sequence losses
    agreement: list[list[float]] = field(default_factory=list)  # recent top-1 agreement per draft position
    # (net, features, ids, log_p, response_start) -> (summed loss, agreement per position); None:
    # the chain or multi-token loss, by the net's kind
    loss: Callable | None = None


def kl_and_agreement(log_p: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Summed KL(p || q) over rows [N, V'] and the rows' top-1 agreement rate."""
    log_q = torch.log_softmax(logits.float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    return kl, (log_p.argmax(-1) == logits.argmax(-1)).float().mean().item() if len(log_p) else 0.0


def chain_loss(net: ChainNet, features, ids, log_p, response_start: int, unroll: int, decay: float):
    """features [T - 1, W] (f_0..f_{T-2}), ids [T], log_p [T - response_start, V'] (row u: the
    target's distribution of ids[response_start + u], a response token). The output at position t
    predicts ids[t + 2]: response tokens from t = response_start - 2 on."""
    length = len(features)
    from_row = max(0, response_start - 1 - unroll)  # later steps only where losses (and their keys) are
    outputs = net.unrolled(features, ids[1:], unroll, from_row)  # [T - 1, H], then [T - 1 - from_row, H] per step
    total, agreement = 0.0, []
    for j, predicted in enumerate(outputs):
        first = max(j, response_start - 2)  # first position with a loss
        offset = 0 if j == 0 else from_row  # position of the output's first row
        kl, agree = kl_and_agreement(log_p[first + 2 - response_start :], net.logits(predicted[first - offset : length - 1 - offset]))
        total = total + decay**j * kl
        agreement.append(agree)
    return total, agreement


def multi_token_loss(net: MultiTokenNet, features, ids, log_p, response_start: int):
    """Head k (0-based) at position t predicts ids[t + 2 + k] (log_p row t + 2 + k - response_start)."""
    length = len(features)
    first_input = max(response_start - 2 - (len(net.heads) - 1), 0)  # earliest position any head needs
    heads = net.predicted(features[first_input : length - 1], ids[first_input + 1 : length])  # per head [.., H]
    total, agreement = 0.0, []
    for k, predicted in enumerate(heads):
        first = max(response_start - 2 - k, 0)
        last = length - 1 - k  # exclusive: ids[t + 2 + k] must exist
        if last <= first:
            agreement.append(0.0)
            continue
        kl, agree = kl_and_agreement(log_p[first + 2 + k - response_start : last + 2 + k - response_start], net.logits(predicted[first - first_input : last - first_input]))
        total = total + kl
        agreement.append(agree)
    return total, agreement


def fast_dtype() -> str:
    """The faster of float32 and bfloat16 for a training-sized product on this processor (AMX
    makes bfloat16 about twice as fast; without AVX512-BF16 it is many times slower)."""
    a, w = torch.randn(256, 576, requires_grad=True), torch.randn(4096, 576, requires_grad=True)

    def seconds(enabled: bool) -> float:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                product = a @ w.T
            product.float().sum().backward()
            best = min(best, time.perf_counter() - started)
        return best

    return "bfloat16" if seconds(True) < 0.8 * seconds(False) else "float32"


def learning_rate(settings: TrainSettings, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / max(1, settings.warmup_steps))
    return settings.learning_rate * warm * (0.1 + 0.9 * max(0.0, 1.0 - progress))


def train(
    trainees: list[Trainee],
    store: FeatureStore,
    examples: Callable[[], list[FeatureExample]],
    settings: TrainSettings,
    checkpoint: Path,
    report: Callable[[int, float, list[Trainee], int], None],
) -> dict:
    """Train the nets in place; returns {"steps", "seconds", "tokens", "epochs"} of this run and
    the earlier ones it resumed. `examples()` is read again at every epoch, so training can start
    while the corpus is still being written (the store only appends)."""
    for t in trainees:
        t.net.train()
        t.optimizer = torch.optim.AdamW([p for p in t.net.parameters() if p.requires_grad], lr=settings.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    state = _resume(checkpoint, trainees)
    started, last_checkpoint = time.monotonic() - state["seconds"], time.monotonic()
    labels_from = trainees[0].net
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bfloat16)
    while True:
        usable = [e for e in examples() if len(e.response_ids) >= 2 and len(e.prompt_ids) + 2 <= settings.max_sequence]
        order = usable[: state["epoch_size"] or None]  # a resumed epoch: the examples it began with
        state["epoch_size"] = len(order)
        random.Random(settings.seed + state["epochs"]).shuffle(order)
        for example in order[state["position"] :]:
            elapsed = time.monotonic() - started
            progress = max(state["steps"] / settings.steps, elapsed / settings.time_budget_s if settings.time_budget_s else 0.0)
            if progress >= 1.0:
                _save(checkpoint, trainees, state)
                return state
            ids = torch.tensor(example.ids[: settings.max_sequence])
            features = store.features(example)[: len(ids) - 1].float()  # [T - 1, W]
            start = len(example.prompt_ids)
            with torch.no_grad(), autocast:
                log_p = labels_from.target_log_probs(features[start - 1 :]).float()  # [T - start, V']: the response tokens
            for t in trainees:
                with autocast:
                    if t.loss is not None:
                        loss, agreement = t.loss(t.net, features, ids, log_p, start)
                    elif isinstance(t.net, ChainNet):
                        loss, agreement = chain_loss(t.net, features, ids, log_p, start, settings.unroll, settings.decay)
                    else:
                        loss, agreement = multi_token_loss(t.net, features, ids, log_p, start)
                (loss / settings.batch_tokens).backward()
                positions = max(1, len(ids) - start)
                t.losses = (t.losses + [float(loss.detach()) / positions])[-200:]
                t.agreement = (t.agreement + [agreement])[-200:]
            state["position"] += 1
            state["pending"] += len(ids) - start
            if state["pending"] >= settings.batch_tokens:
                for t in trainees:
                    for group in t.optimizer.param_groups:
                        group["lr"] = learning_rate(settings, state["steps"], progress)
                    torch.nn.utils.clip_grad_norm_(t.net.parameters(), 1.0)
                    t.optimizer.step()
                    t.optimizer.zero_grad(set_to_none=True)
                state["steps"] += 1
                state["tokens"] += state["pending"]
                state["pending"] = 0
                state["seconds"] = time.monotonic() - started
                report(state["steps"], progress, trainees, state["tokens"])
                if time.monotonic() - last_checkpoint > settings.checkpoint_every_s:
                    _save(checkpoint, trainees, state)
                    last_checkpoint = time.monotonic()
        state["epochs"] += 1
        state["position"], state["epoch_size"] = 0, 0


def _save(path: Path, trainees: list[Trainee], state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save({"state": state, "nets": {t.name: {"net": t.net.state_dict(), "optimizer": t.optimizer.state_dict()} for t in trainees}}, partial)
    partial.replace(path)


def _resume(path: Path, trainees: list[Trainee]) -> dict:
    fresh = {"steps": 0, "seconds": 0.0, "tokens": 0, "epochs": 0, "position": 0, "epoch_size": 0, "pending": 0}
    if not path.exists():
        return fresh
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if sorted(saved["nets"]) != sorted(t.name for t in trainees):
        raise ValueError(f"{path} holds nets {sorted(saved['nets'])}; remove it or train those")
    for t in trainees:
        t.net.load_state_dict(saved["nets"][t.name]["net"])
        t.optimizer.load_state_dict(saved["nets"][t.name]["optimizer"])
    return {**fresh, **saved["state"], "pending": 0}
