"""TargetService over gRPC: converts protobuf to domain objects and delegates to TargetEngine."""

from __future__ import annotations

from specdec import wire
from specdec.serving import SessionServicerBase, grpc_errors
from specdec.v1 import target_pb2, target_pb2_grpc


class TargetServicer(SessionServicerBase, target_pb2_grpc.TargetServiceServicer):
    @grpc_errors
    async def Verify(self, request: target_pb2.VerifyRequest, context) -> target_pb2.VerifyResponse:
        batch = [wire.verify_item_from_proto(item, index) for index, item in enumerate(request.items)]
        verdicts, seconds = await self.worker.timed(self.engine.verify, batch)
        return target_pb2.VerifyResponse(
            results=[wire.verdict_to_proto(work.session_id, v) for work, v in zip(batch, verdicts)],
            compute_seconds=seconds,
            batch_size=len(batch),
        )
