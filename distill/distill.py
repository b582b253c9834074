"""Knowledge distillation of several students at once from one target.

Each step runs the target once over a batch of (prompt + target response) sequences and trains
every student on the same batch to match the target's next-token distribution at the response
positions: forward KL(p_target || q_student), both restricted to the student's draft vocabulary
and renormalized there (a draft cannot propose outside its head anyway). Students share the
target's forward pass, which is most of a step's cost, so ablations come almost free.

Runs for `steps` or until `time_budget_s`, whichever ends first; the learning rate warms up, then
decays linearly with the progress toward that end. A checkpoint (students, optimizers, step) is
written every `checkpoint_every_s` and at the end; a new run with the same work directory resumes.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from distill.corpus import Example


@dataclass
class DistillSettings:
    steps: int
    time_budget_s: float  # 0: no limit
    batch_tokens: int
    learning_rate: float
    warmup_steps: int
    max_sequence: int
    checkpoint_every_s: float
    seed: int


@dataclass
class Student:
    name: str
    model: torch.nn.Module
    vocabulary: torch.Tensor  # [V'] sorted token ids of the head
    optimizer: torch.optim.Optimizer | None = None
    losses: list[float] = field(default_factory=list)  # recent step losses (for the progress line)
    agreement: list[float] = field(default_factory=list)  # recent top-1 agreement with the target


def training_sequences(examples: list[Example], max_sequence: int) -> list[tuple[list[int], int]]:
    """(prompt + response ids cut to `max_sequence`, index of the first response token), for the
    examples whose prompt leaves room for some response."""
    sequences = []
    for e in examples:
        ids = (e.prompt_ids + e.response_ids)[:max_sequence]
        if len(e.prompt_ids) + 8 <= len(ids):
            sequences.append((ids, len(e.prompt_ids)))
    return sequences


def batches(sequences: list[tuple[list[int], int]], batch_tokens: int, rng: random.Random):
    """Endless batches of about `batch_tokens` padded tokens; similar lengths share a batch."""
    while True:
        order = sequences[:]
        rng.shuffle(order)
        pool = 64 * max(1, batch_tokens // max(1, max(len(s) for s, _ in sequences)))
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda item: len(item[0]))
            groups, current = [], []
            for item in chunk:
                if current and (len(current) + 1) * len(item[0]) > batch_tokens:
                    groups.append(current)
                    current = []
                current.append(item)
            groups.append(current)
            rng.shuffle(groups)
            yield from groups


def collate(group: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids [B, S] (right-padded), attention mask [B, S], loss mask [B, S]: True where the
    position's output predicts a response token."""
    width = max(len(ids) for ids, _ in group)
    input_ids = torch.full((len(group), width), pad, dtype=torch.long)
    attention = torch.zeros(len(group), width, dtype=torch.long)
    loss_mask = torch.zeros(len(group), width, dtype=torch.bool)
    for row, (ids, response_start) in enumerate(group):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        loss_mask[row, response_start - 1 : len(ids) - 1] = True
    return input_ids, attention, loss_mask


def kd_loss(target_logits: torch.Tensor, student_logits: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean forward KL(p || q) over [N, V'] logits, and the top-1 agreement rate."""
    log_p = torch.log_softmax(target_logits.float(), -1)
    log_q = torch.log_softmax(student_logits.float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    agreement = (target_logits.argmax(-1) == student_logits.argmax(-1)).float().mean().item()
    return kl, agreement


def learning_rate(settings: DistillSettings, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / max(1, settings.warmup_steps))
    return settings.learning_rate * warm * (0.1 + 0.9 * max(0.0, 1.0 - progress))


def distill(
    target: torch.nn.Module,
    students: list[Student],
    examples: list[Example],
    settings: DistillSettings,
    checkpoint: Path,
    pad: int,
    report: Callable[[int, float, list[Student], int], None],
) -> dict:
    """Train `students` in place; returns {"steps", "seconds", "tokens"} of this and earlier runs."""
    device = next(target.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    head = target.get_output_embeddings().weight  # [V, D]
    for s in students:
        s.model.to(device).train()
        s.optimizer = torch.optim.AdamW(s.model.parameters(), lr=settings.learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    state = _resume(checkpoint, students)
    rng = random.Random(settings.seed + state["steps"])
    stream = batches(training_sequences(examples, settings.max_sequence), settings.batch_tokens, rng)
    key_of = {s.name: tuple(s.vocabulary.tolist()) for s in students}  # students may share a vocabulary
    vocabularies = {key_of[s.name]: s.vocabulary.to(device) for s in students}
    started, last_checkpoint = time.monotonic() - state["seconds"], time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        progress = max(state["steps"] / settings.steps, elapsed / settings.time_budget_s if settings.time_budget_s else 0.0)
        if progress >= 1.0:
            break
        input_ids, attention, loss_mask = (t.to(device) for t in collate(next(stream), pad))
        with torch.no_grad(), autocast:
            target_hidden = target.model(input_ids=input_ids, attention_mask=attention).last_hidden_state[loss_mask]  # [N, D]
            target_logits = {key: target_hidden @ head[ids].T for key, ids in vocabularies.items()}  # [N, V'] each
        for s in students:
            for group in s.optimizer.param_groups:
                group["lr"] = learning_rate(settings, state["steps"], progress)
            with autocast:
                hidden = s.model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state[loss_mask]  # [N, H]
                ids = vocabularies[key_of[s.name]]
                logits = hidden @ s.model.get_output_embeddings().weight[ids].T  # [N, V']
            loss, agreement = kd_loss(target_logits[key_of[s.name]], logits)
            s.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), 1.0)
            s.optimizer.step()
            s.losses = (s.losses + [loss.item()])[-50:]
            s.agreement = (s.agreement + [agreement])[-50:]
        state["steps"] += 1
        state["tokens"] += int(loss_mask.sum())
        state["seconds"] = time.monotonic() - started
        report(state["steps"], progress, students, state["tokens"])
        if time.monotonic() - last_checkpoint > settings.checkpoint_every_s:
            _save(checkpoint, students, state)
            last_checkpoint = time.monotonic()
    _save(checkpoint, students, state)
    return state


def _save(path: Path, students: list[Student], state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(
        {
            "state": state,
            "students": {s.name: {"model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(), "vocabulary": s.vocabulary} for s in students},
        },
        partial,
    )
    partial.replace(path)


def _resume(path: Path, students: list[Student]) -> dict:
    fresh = {"steps": 0, "seconds": 0.0, "tokens": 0}
    if not path.exists():
        return fresh
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if sorted(saved["students"]) != sorted(s.name for s in students):
        raise ValueError(f"{path} holds students {sorted(saved['students'])}; remove it or train those")
    for s in students:
        s.model.load_state_dict(saved["students"][s.name]["model"])
        s.optimizer.load_state_dict(saved["students"][s.name]["optimizer"])
        s.vocabulary = saved["students"][s.name]["vocabulary"]
    return saved["state"]
