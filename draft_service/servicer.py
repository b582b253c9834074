"""DraftService over gRPC: converts protobuf to domain objects and delegates to DraftEngine
through the batching scheduler, which fuses concurrent Propose calls into one drafter call."""

from __future__ import annotations

import time

from specdec import wire
from specdec.messages import ProposeWork
from specdec.model_service.runtime import SessionServicerBase
from specdec.v1 import draft_pb2, draft_pb2_grpc


class DraftServicer(SessionServicerBase, draft_pb2_grpc.DraftServiceServicer):
    service = "draft"
    batched_rpc = "Propose"

    def run_batch(self, calls: list[list[ProposeWork]]) -> list:
        return self.engine.propose_calls(calls)

    async def Propose(self, request: draft_pb2.ProposeRequest, context) -> draft_pb2.ProposeResponse:
        started = time.perf_counter()
        batch = [wire.propose_item_from_proto(item, index) for index, item in enumerate(request.items)]
        (proposals, passes), info = await self.scheduler.submit(batch)
        response = draft_pb2.ProposeResponse(
            proposals=[wire.proposal_to_proto(work.session_id, p) for work, p in zip(batch, proposals)],
            compute_seconds=info.compute_seconds,
            forward_passes=passes,
            batch_size=info.items,
            queue_seconds=info.queue_seconds,
        )
        response.handler_seconds = time.perf_counter() - started
        return response

    async def ProposeStream(self, requests, context):
        async for request in requests:
            yield await self.Propose(request, context)
