"""DraftService over gRPC: converts protobuf to domain objects and delegates to DraftEngine."""

from __future__ import annotations

from specdec import wire
from specdec.serving import SessionServicerBase, grpc_errors
from specdec.v1 import draft_pb2, draft_pb2_grpc


class DraftServicer(SessionServicerBase, draft_pb2_grpc.DraftServiceServicer):
    @grpc_errors
    async def Propose(self, request: draft_pb2.ProposeRequest, context) -> draft_pb2.ProposeResponse:
        batch = [wire.propose_item_from_proto(item, index) for index, item in enumerate(request.items)]
        (proposals, passes), seconds = await self.worker.timed(self.engine.propose, batch)
        return draft_pb2.ProposeResponse(
            proposals=[wire.proposal_to_proto(work.session_id, p) for work, p in zip(batch, proposals)],
            compute_seconds=seconds,
            forward_passes=passes,
        )
