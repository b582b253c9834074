"""Greedy acceptance of a draft, measured offline on held-out target responses.

Under greedy decoding every accepted token is the target's own token, so the draft always sees the
target's greedy prefix: its proposals are exactly its teacher-forced argmax predictions on the
target's greedy response. One forward pass per response gives, per position, whether the draft
would have proposed the right token; `simulate_rounds` replays speculation with K drafts per round
on those flags (accept the longest correct run, then one target token) and yields tokens per
target forward, the number the services report.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import zip_longest

import torch

from distill.corpus import Example


@dataclass
class Replay:
    tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_at: list[int] = field(default_factory=list)  # [K]: rounds that drafted position i
    accepted_at: list[int] = field(default_factory=list)  # [K]: ... and accepted it

    def add(self, other: "Replay") -> None:
        self.tokens += other.tokens
        self.rounds += other.rounds
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.drafted_at = [a + b for a, b in zip_longest(self.drafted_at, other.drafted_at, fillvalue=0)]
        self.accepted_at = [a + b for a, b in zip_longest(self.accepted_at, other.accepted_at, fillvalue=0)]

    def summary(self) -> dict:
        return {
            "tokens_per_target_forward": self.tokens / self.rounds if self.rounds else 0.0,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "accepted_per_position": [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)],
            "tokens": self.tokens,
        }


def simulate_rounds(correct: list[bool], k: int) -> Replay:
    """Greedy speculation with K drafts per round over a response whose position i the draft gets
    right iff correct[i]. Like the orchestrator with max_new_tokens = len(correct), a round never
    drafts past the end: with r tokens left it drafts at most r - 1."""
    replay, position, length = Replay(drafted_at=[0] * k, accepted_at=[0] * k), 0, len(correct)
    while position < length:
        drafted = min(k, length - position - 1)
        accepted = 0
        while accepted < drafted and correct[position + accepted]:
            accepted += 1
        for i in range(drafted):
            replay.drafted_at[i] += 1
            replay.accepted_at[i] += i < accepted
        replay.tokens += accepted + 1  # + the target's recovered or bonus token
        replay.rounds += 1
        replay.drafted += drafted
        replay.accepted += accepted
        position += accepted + 1
    return replay


@torch.inference_mode()
def teacher_forced_correct(student: torch.nn.Module, vocabulary: torch.Tensor, example: Example, device) -> list[bool]:
    """Per response position: does the student's argmax (over its draft vocabulary) equal the
    target's token?"""
    sequence = torch.tensor([example.prompt_ids + example.response_ids], device=device)  # [1, S]
    hidden = student.model(input_ids=sequence).last_hidden_state[0]  # [S, H]
    start = len(example.prompt_ids) - 1  # the hidden state that predicts the first response token
    predicting = hidden[start : start + len(example.response_ids)]  # [R, H]
    head = student.get_output_embeddings().weight[vocabulary]  # [V', H]
    predicted = vocabulary[(predicting @ head.T).argmax(-1)]  # [R]
    return (predicted.cpu() == torch.tensor(example.response_ids)).tolist()


def acceptance_report(student: torch.nn.Module, vocabulary: torch.Tensor, examples: list[Example], k_values: tuple[int, ...], device) -> dict:
    """Replayed greedy speculation per source and overall, for each K (with the probability that
    draft position i is accepted, given that the round drafted it)."""
    student.eval()
    vocabulary = vocabulary.to(device)
    flags = [(e.source, teacher_forced_correct(student, vocabulary, e, device)) for e in examples]
    report: dict = {}
    for k in k_values:
        totals: dict[str, Replay] = defaultdict(Replay, all=Replay(drafted_at=[0] * k, accepted_at=[0] * k))
        for source, correct in flags:
            replay = simulate_rounds(correct, k)
            totals[source].add(replay)
            totals["all"].add(replay)
        report[f"k{k}"] = {source: replay.summary() for source, replay in sorted(totals.items())}
    student.train()
    return report
