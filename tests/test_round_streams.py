"""A session's rounds on one bidirectional stream per service (orchestrator/streams.py,
TargetService.VerifyStream, DraftService.ProposeStream): the same answers as unary calls, the same
statuses, nothing left open, and a caller that gives up never unmatches questions and answers."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from specdec.errors import Upstream
from specdec.v1 import common_pb2, orchestrator_pb2, target_pb2, target_pb2_grpc

PROMPTS = ["The capital of France is", "Write a haiku about rain", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def stacks(tiny_target, tiny_draft):
    """The same target and draft behind two orchestrators: round streams, and a unary call per round."""
    from draft_service.drafters.model import ModelDrafter
    from harness.inprocess import start_stack
    from harness.tiny import with_eos

    target = with_eos(tiny_target, ())
    running = {
        name: start_stack(target, ModelDrafter(tiny_draft), round_streams=name == "streams") for name in ("streams", "unary")
    }
    yield running
    for stack in running.values():
        stack.stop()


def backends(stack):
    """The orchestrator's GrpcTarget and GrpcDraft."""
    target_set, draft_set = stack.orchestrator.replica_sets
    return target_set.replicas[0].backend, draft_set.replicas[0].backend.draft


def count_opened(stack) -> dict[str, int]:
    """Count the streams the orchestrator opens from now on, per service."""
    opened = {"target": 0, "draft": 0}
    for name, backend in zip(("target", "draft"), backends(stack)):
        streams = backend.streams

        def counting(open_stream=streams._open, name=name):
            opened[name] += 1
            return open_stream()

        streams._open = counting
    return opened


def generate(stack, prompt: str, **fields) -> orchestrator_pb2.GenerateResponse:
    with stack.channel("orchestrator") as channel:
        stub = stack_stub(channel)
        return stub.Generate(orchestrator_pb2.GenerateRequest(prompt=prompt, max_new_tokens=24, **fields), timeout=60)


def stack_stub(channel):
    from specdec.v1 import orchestrator_pb2_grpc

    return orchestrator_pb2_grpc.OrchestratorStub(channel)


GREEDY_K3 = {"temperature": 0.0, "num_speculative_tokens": 3}
SAMPLED_K2 = {"temperature": 1.0, "seed": 7, "num_speculative_tokens": 2}


@pytest.mark.parametrize("fields", [GREEDY_K3, SAMPLED_K2])
def test_rounds_on_streams_give_the_output_of_unary_rounds_and_close_every_stream(stacks, fields):
    opened = count_opened(stacks["streams"])
    for prompt in PROMPTS:
        streamed = generate(stacks["streams"], prompt, **fields)
        unary = generate(stacks["unary"], prompt, **fields)
        assert list(streamed.token_ids) == list(unary.token_ids)
        assert streamed.stats.rounds == unary.stats.rounds > 1
    assert opened == {"target": len(PROMPTS), "draft": len(PROMPTS)}  # one stream per session and service
    for stack in stacks.values():
        target, draft = backends(stack)
        assert (target.streams is None) == (stack is stacks["unary"])
        assert target.streams is None or len(target.streams) == len(draft.streams) == 0
        assert len(stack.target.servicer.engine.sessions) == len(stack.draft.servicer.engine.sessions) == 0


def test_a_cancelled_stream_generation_leaves_no_stream_or_session(stacks):
    stack = stacks["streams"]
    with stack.channel("orchestrator") as channel:
        responses = stack_stub(channel).GenerateStream(
            orchestrator_pb2.GenerateRequest(prompt=PROMPTS[0], max_new_tokens=400, num_speculative_tokens=2, ignore_eos=True),
            timeout=60,
        )
        next(responses)
        responses.cancel()
    target, draft = backends(stack)
    for _ in range(100):
        if len(target.streams) == len(draft.streams) == len(stack.target.servicer.engine.sessions) == 0:
            break
        stack.loop.run(asyncio.sleep(0.05))
    assert len(target.streams) == len(draft.streams) == 0
    assert len(stack.target.servicer.engine.sessions) == len(stack.draft.servicer.engine.sessions) == 0


def test_verify_stream_answers_in_order_and_ends_with_the_unary_status(stacks):
    """Raw VerifyStream: each message is answered as Verify answers it; the first error ends the
    stream with Verify's status (NOT_FOUND naming the field)."""
    stack = stacks["streams"]
    with stack.channel("target") as channel:
        stub = target_pb2_grpc.TargetServiceStub(channel)
        prompt = [5, 6, 7, 8]
        stub.StartSession(common_pb2.StartSessionRequest(session_id="raw", prompt_token_ids=prompt), timeout=30)
        greedy = common_pb2.SamplingParams(top_p=1.0)
        try:
            item = lambda session, prefix_len, token: target_pb2.VerifyRequest(  # noqa: E731
                items=[target_pb2.VerifyItem(session_id=session, prefix_len=prefix_len, tokens=[token], sampling=greedy)]
            )
            rounds = [item("raw", 3, 8), item("raw", 4, 9)]
            unknown = item("nobody", 3, 1)
            answers = stub.VerifyStream(iter([*rounds, unknown]), timeout=30)
            first, second = next(answers), next(answers)
            assert first.results[0].session_id == second.results[0].session_id == "raw"
            with pytest.raises(grpc.RpcError) as error:
                next(answers)
            with pytest.raises(grpc.RpcError) as unary_error:
                stub.Verify(unknown, timeout=30)
            assert error.value.code() == unary_error.value.code() == grpc.StatusCode.NOT_FOUND
            assert error.value.details() == unary_error.value.details()
        finally:
            stub.EndSession(common_pb2.EndSessionRequest(session_id="raw"), timeout=30)


# --- SessionStreams against a scripted stream ------------------------------------------------------


class ScriptedCall:
    """A stream whose answers the test releases one by one: answer i echoes question i."""

    def __init__(self):
        self.written: list = []
        self.answered = 0
        self.released = asyncio.Semaphore(0)
        self.cancelled = self.half_closed = False

    async def write(self, request) -> None:
        self.written.append(request)

    async def read(self):
        await self.released.acquire()
        if self.cancelled:  # as grpc.aio's read of a cancelled call
            raise asyncio.CancelledError()
        self.answered += 1
        return ("answer", self.written[self.answered - 1])

    def cancel(self) -> bool:
        self.cancelled = True
        self.released.release()
        return True

    def end(self, code: grpc.StatusCode, details: str) -> None:
        """The service ends the stream; writing on it then fails as grpc.aio's write does."""
        self.status = (code, details)

        async def write(request) -> None:
            raise asyncio.InvalidStateError("RPC already finished.")

        self.write = write

    async def code(self) -> grpc.StatusCode:
        return self.status[0]

    async def details(self) -> str:
        return self.status[1]

    async def done_writing(self) -> None:
        self.half_closed = True


def scripted_streams():
    from orchestrator.streams import SessionStreams

    calls: list[ScriptedCall] = []

    def open_stream():
        calls.append(ScriptedCall())
        return calls[-1]

    return SessionStreams(open_stream, "draft"), calls


def test_a_caller_that_gives_up_does_not_shift_the_answers():
    async def scenario():
        streams, calls = scripted_streams()
        gave_up = asyncio.ensure_future(streams.exchange("s", "q1", None))
        await asyncio.sleep(0)
        gave_up.cancel()  # a pipelined Propose whose guess failed
        second = asyncio.ensure_future(streams.exchange("s", "q2", None))
        for _ in range(3):
            await asyncio.sleep(0)
        assert calls[0].written == ["q1"]  # q2 waits for q1's answer
        calls[0].released.release()
        calls[0].released.release()
        assert await second == ("answer", "q2")
        assert gave_up.cancelled() and len(calls) == 1 and not calls[0].cancelled
        streams.close("s")
        await asyncio.sleep(0)
        assert calls[0].half_closed and len(streams) == 0

    asyncio.run(scenario())


def test_a_timed_out_exchange_ends_its_stream_and_the_next_round_opens_another():
    async def scenario():
        streams, calls = scripted_streams()
        with pytest.raises(Upstream) as error:
            await streams.exchange("s", "q1", 0.01)
        assert error.value.code_name == "DEADLINE_EXCEEDED" and calls[0].cancelled and len(streams) == 0
        answer = asyncio.ensure_future(streams.exchange("s", "q2", None))
        await asyncio.sleep(0)
        calls[1].released.release()
        assert await answer == ("answer", "q2") and len(calls) == 2
        streams.close("s")

    asyncio.run(scenario())


def test_closing_a_session_while_its_exchange_is_under_way_cancels_the_stream():
    async def scenario():
        streams, calls = scripted_streams()
        pending = asyncio.ensure_future(streams.exchange("s", "q1", None))
        await asyncio.sleep(0)
        streams.close("s")
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert calls[0].cancelled and not calls[0].half_closed and len(streams) == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("steps", range(6))
def test_a_caller_cancelled_as_its_answer_arrives_ends_cancelled(steps):
    """The cancellation wins at every interleaving: a client that disconnected is not served to
    the end (Python 3.11's asyncio.wait_for dropped it when the answer had just come)."""

    async def scenario():
        streams, calls = scripted_streams()
        caller = asyncio.ensure_future(streams.exchange("s", "q1", 60.0))
        for _ in range(3):
            await asyncio.sleep(0)
        calls[0].released.release()  # the answer arrives ...
        for _ in range(steps):
            await asyncio.sleep(0)
        if caller.cancel():  # ... as the caller is cancelled (unless it already returned)
            with pytest.raises(asyncio.CancelledError):
                await caller
        else:
            assert caller.result() == ("answer", "q1")
        streams.close("s")

    asyncio.run(scenario())


@pytest.mark.parametrize("code, expected", [(grpc.StatusCode.OK, "UNAVAILABLE"), (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"),
                                            (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")])
def test_a_stream_the_service_ended_fails_the_round_with_its_status_and_the_next_round_opens_another(code, expected):
    """A draining or stopped service ends the session's stream between two rounds: the next round
    fails with an upstream error (a replica failure, so the session moves), never an internal one."""

    async def scenario():
        streams, calls = scripted_streams()
        first = asyncio.ensure_future(streams.exchange("s", "q1", None))
        for _ in range(3):
            await asyncio.sleep(0)
        calls[0].released.release()
        await first
        calls[0].end(code, "the server is shutting down")
        with pytest.raises(Upstream) as error:
            await streams.exchange("s", "q2", None)
        assert error.value.code_name == expected and len(streams) == 0
        again = asyncio.ensure_future(streams.exchange("s", "q3", None))
        for _ in range(3):
            await asyncio.sleep(0)
        calls[1].released.release()
        assert await again == ("answer", "q3")
        streams.close("s")

    asyncio.run(scenario())
