"""Per-request statistics of a generation, and their protobuf form: every field of GenerationStats
in orchestrator.proto is an attribute (or property) of the same name here, from which `to_proto`
copies it; the remaining attributes are internal counters (logged, and used for the metrics)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from orchestrator.backends import CallCost
from specdec.v1 import orchestrator_pb2


@dataclass
class GenerationStats:
    num_speculative_tokens: int = 0
    adaptive_k: bool = False
    generated_tokens: int = 0
    committed_tokens: int = 0  # tokens the target committed, including any cut off by a stop or EOS
    rounds: int = 0
    drafts: int = 0  # rounds that verified at least one draft token (vLLM's num_drafts)
    draft_tokens: int = 0
    accepted_tokens: int = 0
    target_forward_passes: int = 0
    draft_forward_passes: int = 0
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    network_seconds: float = 0.0
    queue_seconds: float = 0.0  # waiting in the model services' batching queues
    orchestrator_seconds: float = 0.0  # the round loop's own work between calls (see orchestrator.proto)
    draft_conversion_seconds: float = 0.0
    target_conversion_seconds: float = 0.0
    draft_transport_seconds: float = 0.0
    target_transport_seconds: float = 0.0
    draft_service_overhead_seconds: float = 0.0
    target_service_overhead_seconds: float = 0.0
    network_bytes: int = 0
    total_seconds: float = 0.0
    time_to_first_token_seconds: float = 0.0
    accepted_per_position: list[int] = field(default_factory=list)
    pipelined_rounds: int = 0  # rounds whose drafts were proposed during the previous verify (see speculation.py)
    target_rebuilds: int = 0  # target sessions started again after their replica failed
    draft_rebuilds: int = 0
    prompt_tokens: int = 0  # the prompt's length in tokens (the HTTP API's usage; not in the proto)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.committed_tokens / self.target_forward_passes if self.target_forward_passes else 0.0

    @property
    def bytes_per_round(self) -> float:
        return self.network_bytes / self.rounds if self.rounds else 0.0

    def add_target_call(self, cost: CallCost) -> None:
        self.target_seconds += cost.compute_s
        transport, overhead = self._add_network(cost)
        self.target_transport_seconds += transport
        self.target_service_overhead_seconds += overhead
        self.target_conversion_seconds += cost.conversion_s

    def add_draft_call(self, cost: CallCost) -> None:
        self.draft_seconds += cost.compute_s
        self.draft_forward_passes += cost.forward_passes
        transport, overhead = self._add_network(cost)
        self.draft_transport_seconds += transport
        self.draft_service_overhead_seconds += overhead
        self.draft_conversion_seconds += cost.conversion_s

    def _add_network(self, cost: CallCost) -> tuple[float, float]:
        """Count a call's time outside compute and queue; return its split into transport and the
        service's own overhead (calls that do not report their handler time, session starts,
        count all of it as transport)."""
        self.queue_seconds += cost.queue_s
        self.network_bytes += cost.bytes
        outside = max(cost.wall_s - cost.compute_s - cost.queue_s, 0.0)
        self.network_seconds += outside
        transport = min(max(cost.wall_s - (cost.handler_s or cost.compute_s + cost.queue_s), 0.0), outside)
        return transport, outside - transport

    def add_round(self, drafted: int, accepted: int) -> None:
        self.rounds += 1
        if self.adaptive_k:
            self.num_speculative_tokens = max(self.num_speculative_tokens, drafted)
        self.drafts += drafted > 0
        self.target_forward_passes += 1
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        self.committed_tokens += accepted + 1
        if len(self.accepted_per_position) < drafted:
            self.accepted_per_position.extend([0] * (drafted - len(self.accepted_per_position)))
        for position in range(accepted):
            self.accepted_per_position[position] += 1

    def to_proto(self) -> orchestrator_pb2.GenerationStats:
        fields = orchestrator_pb2.GenerationStats.DESCRIPTOR.fields
        return orchestrator_pb2.GenerationStats(**{f.name: getattr(self, f.name) for f in fields})

    def summary(self, session_id: str, prompt_tokens: int, finish_reason: str) -> dict:
        """One structured log record per request."""
        return {
            "session_id": session_id,
            "prompt_tokens": prompt_tokens,
            "finish_reason": finish_reason,
            **asdict(self),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_target_forward": round(self.tokens_per_target_forward, 4),
            "bytes_per_round": round(self.bytes_per_round, 1),
        }
