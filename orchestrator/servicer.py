"""The public Orchestrator API over gRPC: converts protobuf to a GenerationRequest, passes the
client's deadline on, delegates to the GenerationEngine, and records each request's metrics at its end."""

from __future__ import annotations

import time
from typing import AsyncIterator

from orchestrator.generation import GenerationEngine, GenerationEvent, GenerationRequest
from orchestrator.stats import GenerationStats
from specdec import metrics, wire
from specdec.errors import Unavailable
from specdec.v1 import orchestrator_pb2, orchestrator_pb2_grpc

FINISH_REASONS = {
    "length": orchestrator_pb2.FINISH_REASON_LENGTH,
    "stop": orchestrator_pb2.FINISH_REASON_STOP,
    "eos": orchestrator_pb2.FINISH_REASON_EOS,
}


def request_from_proto(message: orchestrator_pb2.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        prompt=message.prompt,
        messages=tuple((m.role, m.content) for m in message.messages),
        max_new_tokens=message.max_new_tokens,
        temperature=message.temperature,
        top_p=message.top_p if message.HasField("top_p") else 1.0,
        top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None,
        stop=tuple(message.stop),
        num_speculative_tokens=message.num_speculative_tokens if message.HasField("num_speculative_tokens") else None,
        logprobs=message.logprobs if message.HasField("logprobs") else None,
        warped_logprobs=message.warped_logprobs,
        min_p=message.min_p,
        repetition_penalty=message.repetition_penalty if message.HasField("repetition_penalty") else 1.0,
        presence_penalty=message.presence_penalty,
        frequency_penalty=message.frequency_penalty,
        logit_bias=tuple(message.logit_bias.items()),
        stop_token_ids=tuple(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        seed_stable=message.seed_stable,
        min_tokens=message.min_tokens,
        include_stop_str_in_output=message.include_stop_str_in_output,
        skip_special_tokens=message.skip_special_tokens if message.HasField("skip_special_tokens") else True,
        grammar=wire.grammar_from_proto(message.grammar, message.HasField("grammar"), "grammar"),
    )


METRICS_SERVICE = "orchestrator"  # the `service` label of its metrics


def record_metrics(stats: GenerationStats, finish_reason: str) -> None:
    """Add a finished request to the Prometheus metrics (specdec/metrics.py)."""
    labels = {"service": METRICS_SERVICE}
    metrics.DRAFTS.labels(**labels).inc(stats.drafts)
    metrics.DRAFT_TOKENS.labels(**labels).inc(stats.draft_tokens)
    metrics.ACCEPTED_TOKENS.labels(**labels).inc(stats.accepted_tokens)
    for position, accepted in enumerate(stats.accepted_per_position):
        metrics.ACCEPTED_PER_POSITION.labels(position=str(position), **labels).inc(accepted)
    metrics.EMITTED_TOKENS.labels(**labels).inc(stats.committed_tokens)
    metrics.TARGET_FORWARDS.labels(**labels).inc(stats.target_forward_passes)
    metrics.GENERATION_TOKENS.labels(**labels).inc(stats.generated_tokens)
    metrics.SESSION_REBUILDS.labels(role="target", **labels).inc(stats.target_rebuilds)
    metrics.SESSION_REBUILDS.labels(role="draft", **labels).inc(stats.draft_rebuilds)
    metrics.E2E_LATENCY.labels(**labels).observe(stats.total_seconds)
    if stats.generated_tokens:
        metrics.TIME_TO_FIRST_TOKEN.labels(**labels).observe(stats.time_to_first_token_seconds)
    if stats.generated_tokens > 1:
        after_first = stats.total_seconds - stats.time_to_first_token_seconds
        metrics.TIME_PER_OUTPUT_TOKEN.labels(**labels).observe(after_first / (stats.generated_tokens - 1))
    metrics.REQUEST_SUCCESS.labels(finished_reason=finish_reason, **labels).inc()


def event_to_proto(event: GenerationEvent) -> orchestrator_pb2.GenerateResponse:
    response = orchestrator_pb2.GenerateResponse(text=event.text, token_ids=event.token_ids)
    if event.logprobs is not None:
        for logprob, ids, values in zip(event.logprobs.logprobs, event.logprobs.top_token_ids, event.logprobs.top_logprobs):
            response.logprobs.add(logprob=logprob, top_token_ids=ids, top_logprobs=values)
    if event.finish_reason is not None:
        response.finish_reason = FINISH_REASONS[event.finish_reason]
        response.stats.CopyFrom(event.stats.to_proto())
    return response


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, default_timeout_s: float | None = None):
        self.engine: GenerationEngine | None = None
        self.default_timeout_s = default_timeout_s
        self.running = 0  # requests in progress (specdec:num_sessions_running)

    def _ready(self) -> GenerationEngine:
        if self.engine is None:
            raise Unavailable("the orchestrator is still connecting to the model services")
        return self.engine

    def _deadline(self, context) -> float | None:
        """The client's deadline, else the server's default, as a time.monotonic() instant."""
        left = context.time_remaining()
        if left is None or left > 1e9:  # no deadline set by the client
            left = self.default_timeout_s
        return None if left is None else time.monotonic() + left

    async def events(self, request: GenerationRequest, deadline: float | None) -> AsyncIterator[GenerationEvent]:
        """The request's events; counted while running, and in the metrics at the end. The gRPC
        methods and the HTTP API (orchestrator/openai_api/) both run their generations through here."""
        self.running += 1
        try:
            with metrics.count_errors(METRICS_SERVICE):
                async for event in self._ready().stream(request, deadline):
                    if event.finish_reason is not None:
                        record_metrics(event.stats, event.finish_reason)
                    yield event
        finally:
            self.running -= 1

    def _events(self, request, context) -> AsyncIterator[GenerationEvent]:
        return self.events(request_from_proto(request), self._deadline(context))

    async def Generate(self, request, context):
        events = [event async for event in self._events(request, context)]
        return event_to_proto(GenerationEvent.joined(events))

    async def GenerateStream(self, request, context):
        async for event in self._events(request, context):
            yield event_to_proto(event)
