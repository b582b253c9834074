"""How the orchestrator reaches the model services: over gRPC, or in-process for tests and
benchmarks that want the same loop without the network. Both expose the same small interface;
each call also reports its cost (wall time, the service's compute time, bytes exchanged), which
is how the stats split time between draft, target and network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import grpc

from orchestrator.streams import SessionStreams, upstream_error
from specdec import wire
from specdec.errors import SpecdecError, Upstream
from specdec.grammar import Grammar
from specdec.messages import ModelInfo, Proposal, ProposeWork, VerifyWork
from specdec.sampling import Verdict
from specdec.v1 import common_pb2, draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc


@dataclass(frozen=True)
class CallCost:
    wall_s: float
    compute_s: float
    bytes: int = 0
    forward_passes: int = 0
    queue_s: float = 0.0  # waiting in the service's batching queue
    batch_size: int = 1  # sequences in the batch the call ran in
    batch_tokens: int = 0  # tokens the batch's forward pass scored (target)
    handler_s: float = 0.0  # in the service's handler (queue and compute included); 0: not reported
    conversion_s: float = 0.0  # building the request and reading the response, here


class SessionBackend(Protocol):
    async def info(self, timeout: float | None = None) -> ModelInfo: ...
    async def start_session(
        self, session_id: str, prompt: list[int], timeout: float | None, prompt_len: int = 0, grammar: Grammar | None = None
    ) -> CallCost: ...
    async def end_session(self, session_id: str, timeout: float | None) -> bool: ...


class TargetBackend(SessionBackend, Protocol):
    async def start_session(
        self, session_id: str, prompt: list[int], timeout: float | None, prompt_len: int = 0, grammar: Grammar | None = None,
        feature_layers: tuple[int, ...] = (),
    ) -> CallCost: ...

    async def verify(self, work: VerifyWork, timeout: float | None) -> tuple[Verdict, CallCost]: ...


class DraftBackend(SessionBackend, Protocol):
    async def propose(self, work: ProposeWork, timeout: float | None) -> tuple[Proposal, CallCost]: ...


class _GrpcSessions:
    """GetModelInfo, StartSession and EndSession over a stub of either model service."""

    role = "model"

    def __init__(self, stub, streams: SessionStreams | None = None):
        self.stub = stub
        self.streams = streams  # None: a unary call per round

    async def _round(self, unary, session_id: str, request, timeout: float | None):
        """One round's call: on the session's stream, or unary."""
        if self.streams is None:
            return await self._call(unary, request, timeout)
        return await self.streams.exchange(session_id, request, timeout)

    async def _call(self, method, request, timeout: float | None, wait_for_ready: bool = False):
        try:
            return await method(request, timeout=timeout, wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError as error:
            raise upstream_error(error.code(), error.details(), self.role) from error

    async def info(self, timeout: float | None = None) -> ModelInfo:
        response = await self._call(self.stub.GetModelInfo, common_pb2.GetModelInfoRequest(), timeout, wait_for_ready=True)
        return wire.model_info_from_proto(response)

    async def start_session(
        self, session_id: str, prompt: list[int], timeout: float | None, prompt_len: int = 0, grammar: Grammar | None = None,
        feature_layers: tuple[int, ...] = (),
    ) -> CallCost:
        request = common_pb2.StartSessionRequest(session_id=session_id, prompt_token_ids=prompt, feature_layers=feature_layers, prompt_len=prompt_len,
                                                 grammar=wire.grammar_to_proto(grammar))
        started = time.perf_counter()
        response = await self._call(self.stub.StartSession, request, timeout)
        return CallCost(time.perf_counter() - started, response.compute_seconds, request.ByteSize() + response.ByteSize())

    async def end_session(self, session_id: str, timeout: float | None) -> bool:
        if self.streams is not None:
            self.streams.close(session_id)
        response = await self._call(self.stub.EndSession, common_pb2.EndSessionRequest(session_id=session_id), timeout)
        return response.existed


class GrpcTarget(_GrpcSessions):
    role = "target"

    def __init__(self, channel: grpc.aio.Channel, round_streams: bool = True):
        stub = target_pb2_grpc.TargetServiceStub(channel)
        super().__init__(stub, SessionStreams(stub.VerifyStream, self.role) if round_streams else None)

    async def verify(self, work: VerifyWork, timeout: float | None) -> tuple[Verdict, CallCost]:
        converting = time.perf_counter()
        request = target_pb2.VerifyRequest(items=[wire.verify_item_to_proto(work)])
        started = time.perf_counter()
        response = await self._round(self.stub.Verify, work.session_id, request, timeout)
        ended = time.perf_counter()
        verdict = wire.verdict_from_proto(response.results[0])
        cost = CallCost(
            ended - started,
            response.compute_seconds,
            request.ByteSize() + response.ByteSize(),
            1,
            response.queue_seconds,
            response.batch_size,
            response.batch_tokens,
            response.handler_seconds,
            (started - converting) + (time.perf_counter() - ended),
        )
        return verdict, cost


class GrpcDraft(_GrpcSessions):
    role = "draft"

    def __init__(self, channel: grpc.aio.Channel, round_streams: bool = True):
        stub = draft_pb2_grpc.DraftServiceStub(channel)
        super().__init__(stub, SessionStreams(stub.ProposeStream, self.role) if round_streams else None)

    async def propose(self, work: ProposeWork, timeout: float | None) -> tuple[Proposal, CallCost]:
        converting = time.perf_counter()
        request = draft_pb2.ProposeRequest(items=[wire.propose_item_to_proto(work)])
        started = time.perf_counter()
        response = await self._round(self.stub.Propose, work.session_id, request, timeout)
        ended = time.perf_counter()
        proposal = wire.proposal_from_proto(response.proposals[0])
        cost = CallCost(
            ended - started,
            response.compute_seconds,
            request.ByteSize() + response.ByteSize(),
            response.forward_passes,
            response.queue_seconds,
            response.batch_size,
            handler_s=response.handler_seconds,
            conversion_s=(started - converting) + (time.perf_counter() - ended),
        )
        return proposal, cost


class _InProcessSessions:
    """The session RPCs called directly on an engine (no network, no serialization)."""

    def __init__(self, engine):
        self.engine = engine

    async def info(self, timeout: float | None = None) -> ModelInfo:
        return self.engine.info()

    async def start_session(
        self, session_id: str, prompt: list[int], timeout: float | None, prompt_len: int = 0, grammar: Grammar | None = None
    ) -> CallCost:
        seconds = self.engine.start_session(session_id, prompt, prompt_len, grammar)
        return CallCost(seconds, seconds)

    async def end_session(self, session_id: str, timeout: float | None) -> bool:
        return self.engine.end_session(session_id)


class InProcessTarget(_InProcessSessions):
    async def start_session(
        self, session_id: str, prompt: list[int], timeout: float | None, prompt_len: int = 0, grammar: Grammar | None = None,
        feature_layers: tuple[int, ...] = (),
    ) -> CallCost:
        seconds = self.engine.start_session(session_id, prompt, feature_layers, prompt_len, grammar)
        return CallCost(seconds, seconds)

    async def verify(self, work: VerifyWork, timeout: float | None) -> tuple[Verdict, CallCost]:
        started = time.perf_counter()
        verdict = self.engine.verify([work])[0]
        seconds = time.perf_counter() - started
        return verdict, CallCost(seconds, seconds, 0, 1, batch_tokens=len(work.tokens) + len(work.draft_tokens))


class InProcessDraft(_InProcessSessions):
    async def propose(self, work: ProposeWork, timeout: float | None) -> tuple[Proposal, CallCost]:
        started = time.perf_counter()
        proposals, passes = self.engine.propose([work])
        seconds = time.perf_counter() - started
        return proposals[0], CallCost(seconds, seconds, 0, passes)


def is_draft_failure(error: SpecdecError) -> bool:
    """Errors after which the request goes on without the draft: the draft service is gone,
    overloaded, too slow or broken. Output stays exact, only slower."""
    return isinstance(error, Upstream)
