"""Generation through the real services: one service stack per drafter (all up at once, so every
configuration runs on the same prompt back to back), target-only decoding as K=0 on the first.

Each measurement is one `Generate` call; its record holds the client-side wall time and the
orchestrator's statistics (acceptance, forward passes, time in draft, target and network, bytes
per round, acceptance per draft position).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from bench.specbench import BenchPrompt
from harness.processes import ServiceStack
from specdec.v1 import orchestrator_pb2

TARGET_ONLY = "target-only"
SELF_DRAFT = "self-draft:"  # a drafter spelled self-draft:X: the target drafts for itself (--self-draft X)


def drafter_label(drafter: str) -> str:
    """A drafter's short name in reports: a directory's last part (self-drafts keep their prefix)."""
    if drafter.startswith(SELF_DRAFT):
        return SELF_DRAFT + Path(drafter.removeprefix(SELF_DRAFT)).name
    return Path(drafter).name


@dataclass(frozen=True)
class ServiceConfig:
    drafter: str  # TARGET_ONLY, "ngram", a draft model, or self-draft:X
    k: int

    @property
    def name(self) -> str:
        return TARGET_ONLY if self.k == 0 else f"{drafter_label(self.drafter)} K={self.k}"


def service_configs(drafters: list[str], ks: list[int]) -> list[ServiceConfig]:
    return [ServiceConfig(TARGET_ONLY, 0)] + [ServiceConfig(d, k) for d in drafters for k in ks]


class ServiceBench:
    """Context manager holding one stack per drafter."""

    def __init__(self, drafters: list[str], target: str, device: str, dtype: str, log_dir: Path):
        self.drafters, self.target, self.device, self.dtype, self.log_dir = drafters, target, device, dtype, log_dir
        self.stacks: dict[str, ServiceStack] = {}
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> "ServiceBench":
        model_flags = ("--device", self.device, "--dtype", self.dtype)
        with self._exit:
            for index, drafter in enumerate(self.drafters or ["ngram"]):
                self_draft = drafter.removeprefix(SELF_DRAFT) if drafter.startswith(SELF_DRAFT) else ""
                stack = ServiceStack(
                    target_model=self.target,
                    draft_model=drafter,
                    log_dir=self.log_dir / f"stack{index}",
                    extra_target_args=model_flags,
                    extra_draft_args=model_flags if drafter != "ngram" else (),
                    self_draft=self_draft,
                )
                self.stacks[drafter] = self._exit.enter_context(stack)
            self._exit = self._exit.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._exit.close()

    def stack_for(self, config: ServiceConfig) -> ServiceStack:
        return self.stacks[config.drafter] if config.k else next(iter(self.stacks.values()))

    def measure(self, config: ServiceConfig, prompt: BenchPrompt, max_new_tokens: int, temperature: float, seed: int) -> dict:
        request = orchestrator_pb2.GenerateRequest(
            max_new_tokens=max_new_tokens, temperature=temperature, num_speculative_tokens=config.k, seed=seed
        )
        request.messages.add(role="user", content=prompt.text)
        started = time.perf_counter()
        response = self.stack_for(config).orchestrator_stub().Generate(request, timeout=1800)
        seconds = time.perf_counter() - started
        s = response.stats
        return {
            "question_id": prompt.question_id,
            "category": prompt.category,
            "method": config.name,
            "drafter": config.drafter,
            "k": config.k,
            "token_ids": list(response.token_ids),
            "tokens": s.generated_tokens,
            "seconds": seconds,
            "tokens_per_second": s.generated_tokens / seconds,
            "time_to_first_token": s.time_to_first_token_seconds,
            "acceptance_rate": s.acceptance_rate if config.k else None,
            "tokens_per_target_forward": s.tokens_per_target_forward,
            "target_forward_passes": s.target_forward_passes,
            "draft_forward_passes": s.draft_forward_passes,
            "draft_tokens": s.draft_tokens,
            "accepted_tokens": s.accepted_tokens,
            "accepted_per_position": list(s.accepted_per_position),
            "rounds": s.rounds,
            "target_seconds": s.target_seconds,
            "draft_seconds": s.draft_seconds,
            "network_seconds": s.network_seconds,
            "bytes_per_round": s.bytes_per_round,
        }
