"""TargetService over gRPC: converts protobuf to domain objects and delegates to TargetEngine
through the batching scheduler, which fuses concurrent Verify calls into one forward pass and runs
prompt prefills in chunks between batches."""

from __future__ import annotations

import asyncio
import time

from specdec import wire
from specdec.grammar import Grammar
from specdec.messages import VerifyWork
from specdec.model_service.batching import BatchingConfig
from specdec.model_service.runtime import ModelWorker, SessionServicerBase, timed
from specdec.v1 import common_pb2, target_pb2, target_pb2_grpc


class TargetServicer(SessionServicerBase, target_pb2_grpc.TargetServiceServicer):
    service = "target"
    batched_rpc = "Verify"

    def __init__(self, worker: ModelWorker, batching: BatchingConfig = BatchingConfig(), prefill_chunk_tokens: int = 0):
        super().__init__(worker, batching)
        self.prefill_chunk_tokens = prefill_chunk_tokens

    def run_batch(self, calls: list[list[VerifyWork]]) -> list:
        return self.engine.verify_calls(calls)

    @staticmethod
    def tokens_of(item: VerifyWork) -> int:
        return len(item.tokens) + len(item.draft_tokens)

    async def StartSession(self, request, context):
        grammar = wire.grammar_from_proto(request.grammar, request.HasField("grammar"), "grammar")
        seconds = await self.start_session(request.session_id, list(request.prompt_token_ids), request.prompt_len, grammar, tuple(request.feature_layers))
        return common_pb2.StartSessionResponse(compute_seconds=seconds)

    async def start_session(
        self, session_id: str, prompt: list[int], prompt_len: int = 0, grammar: Grammar | None = None, feature_layers: tuple[int, ...] = ()
    ) -> float:
        """Prefill chunk by chunk, each chunk a job between two Verify batches; a prefill that
        fails or is cancelled ends the session."""
        engine = self.engine
        left, seconds = await self.scheduler.job(timed(engine.begin_session), session_id, prompt, self.prefill_chunk_tokens, feature_layers, prompt_len, grammar)
        try:
            while left:
                left, chunk_seconds = await self.scheduler.job(timed(engine.prefill), session_id)
                seconds += chunk_seconds
        except BaseException:
            await asyncio.shield(self.scheduler.job(engine.end_session, session_id, urgent=True))
            raise
        return seconds

    async def Verify(self, request: target_pb2.VerifyRequest, context) -> target_pb2.VerifyResponse:
        started = time.perf_counter()
        batch = [wire.verify_item_from_proto(item, index) for index, item in enumerate(request.items)]
        verdicts, info = await self.scheduler.submit(batch)
        response = target_pb2.VerifyResponse(
            results=[wire.verdict_to_proto(work.session_id, v) for work, v in zip(batch, verdicts)],
            compute_seconds=info.compute_seconds,
            batch_size=info.items,
            queue_seconds=info.queue_seconds,
            batch_tokens=info.tokens,
        )
        response.handler_seconds = time.perf_counter() - started
        return response

    async def VerifyStream(self, requests, context):
        async for request in requests:
            yield await self.Verify(request, context)
