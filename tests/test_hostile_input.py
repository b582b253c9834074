"""Hostile input on every RPC of the three services, as property-based tests (hypothesis).

The boundary under test is the gRPC edge of each service: whatever a caller sends (NaN, infinite,
negative or oversized probability payloads, token ids outside the vocabulary, huge K and
max_new_tokens, megabyte prompts, unknown and reused session ids, empty and duplicate items,
undecodable bytes), the answer is either a success or a clear status: INVALID_ARGUMENT with a
`google.rpc.BadRequest` naming a field that exists in the request, FAILED_PRECONDITION or
RESOURCE_EXHAUSTED. Never INTERNAL or UNKNOWN, which would mean the input reached code that did
not expect it. After each example no session is left behind, and after each test a normal
generation still works (no service crashed or wedged).

Real servers on loopback ports with tiny models; the example counts are bounded so that the module
runs in well under 90 s on two cores. Longer than our ~400-line guide: the strategies for every
message of the three protos and the answer checks they share stay in one module, so that a new
field gets its hostile values next to the others.
"""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from draft_service.drafters.model import ModelDrafter
from harness.inprocess import start_stack
from harness.probes import wait_for_sessions
from harness.tiny import with_eos
from specdec.v1 import common_pb2, draft_pb2, draft_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc, target_pb2, target_pb2_grpc
from tests.helpers import bad_request_fields

CLEAR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}
EXAMPLES = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PROMPT = [1, 2, 3, 4, 5]  # every live session's prompt: the target then holds 4 tokens, the draft 5
MIB = 1 << 20


@pytest.fixture(scope="module")
def stack(tiny_target):
    """Target = tiny_target, draft = a model drafter on the same model (it samples, so uniforms and
    draft distributions are checked too)."""
    target = with_eos(tiny_target, ())
    running = start_stack(target, ModelDrafter(target))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stubs(stack):
    channels = {which: stack.channel(which) for which in ("orchestrator", "target", "draft")}
    yield {
        "orchestrator": orchestrator_pb2_grpc.OrchestratorStub(channels["orchestrator"]),
        "target": target_pb2_grpc.TargetServiceStub(channels["target"]),
        "draft": draft_pb2_grpc.DraftServiceStub(channels["draft"]),
    }
    for channel in channels.values():
        channel.close()


@pytest.fixture(scope="module")
def vocab(stubs) -> int:
    return stubs["target"].GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).vocab_size


@pytest.fixture(autouse=True)
def services_survive(stack, stubs):
    """After every test: no session held, and a normal request still works."""
    yield
    assert wait_for_sessions(stack) == (0, 0)
    reply = stubs["orchestrator"].Generate(orchestrator_pb2.GenerateRequest(prompt="Hello there", max_new_tokens=4), timeout=30)
    assert reply.stats.generated_tokens == 4


# --- checking an answer ---------------------------------------------------------------------------


INDEX = r"\[\d+\]"


def field_exists(descriptor: Descriptor, path: str) -> bool:
    """Whether a BadRequest field path such as `items[0].draft_probs[1].probs` names a field of the
    request message (indexes stripped, nested messages followed)."""
    for name in path.split("."):
        field = descriptor.fields_by_name.get(re.sub(INDEX + "$", "", name)) if descriptor else None
        if field is None:
            return False
        descriptor = field.message_type
    return True


def assert_clear(error: grpc.RpcError, request) -> None:
    """A clear status: one of CLEAR, and INVALID_ARGUMENT names a field of `request`."""
    assert error.code() in CLEAR, f"{error.code().name}: {error.details()}"
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        fields = bad_request_fields(error)
        assert fields, f"INVALID_ARGUMENT without a BadRequest detail: {error.details()}"
        assert all(field_exists(request.DESCRIPTOR, f) for f in fields), f"{fields} not in {request.DESCRIPTOR.name}"


def call(method, request, timeout: float = 30):
    """The reply, or None after checking that the error is clear."""
    try:
        reply = method(request, timeout=timeout)
    except grpc.RpcError as error:
        assert_clear(error, request)
        # --hypothesis-show-statistics shows which checks the examples reached
        event(f"{error.code().name} {' '.join(re.sub(INDEX, '[]', f) for f in bad_request_fields(error))}")
        return None
    event("OK")
    return reply


# --- strategies -------------------------------------------------------------------------------------
# Each request starts valid and gets up to two fields replaced by hostile values: one defect at a
# time reaches the check that guards it (a request broken everywhere only tests the first check).

INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
wild_token_ids = st.one_of(st.integers(-3, -1), st.integers(49_000, 50_000), INT32)
wild_floats = st.one_of(
    st.sampled_from([-1.0, float("nan"), float("inf"), float("-inf"), 1e-45, 1e-30, 1e30, 0.0, 1.0]), st.floats(width=32)
)
wild_sampling = st.builds(
    common_pb2.SamplingParams, temperature=wild_floats, top_k=st.one_of(st.integers(-1, 70), INT32), top_p=wild_floats
)
wild_session_ids = st.one_of(st.just(""), st.text(max_size=40), st.text(min_size=5000, max_size=5000))
valid_sampling = st.sampled_from(
    [common_pb2.SamplingParams(top_p=1.0), common_pb2.SamplingParams(temperature=1.0, top_p=1.0),
     common_pb2.SamplingParams(temperature=0.7, top_k=20, top_p=0.9)]
)
small_ids = st.integers(0, 300)


def with_defects(draw, valid: dict, wild: dict) -> dict:
    """`valid` field values with up to two of them replaced by a draw from `wild`."""
    for name in draw(st.sets(st.sampled_from(sorted(wild)), max_size=2)):
        valid[name] = draw(wild[name])
    return valid


@st.composite
def distributions(draw, token: int) -> common_pb2.SparseDistribution:
    """A well-formed sparse distribution whose support holds `token`."""
    others = draw(st.lists(small_ids.filter(lambda t: t != token), max_size=4, unique=True))
    ids = np.array([token, *others])
    weights = np.array(draw(st.lists(st.floats(0.01, 1.0), min_size=len(ids), max_size=len(ids))))
    return pack(ids, weights / weights.sum())


def pack(ids, probs) -> common_pb2.SparseDistribution:
    return common_pb2.SparseDistribution(token_ids=np.asarray(ids, "<i4").tobytes(), probs=np.asarray(probs, "<f4").tobytes())


BREAKS = {
    "nan": lambda ids, probs: (ids, np.where(np.arange(len(probs)) == 0, np.nan, probs)),
    "inf": lambda ids, probs: (ids, np.where(np.arange(len(probs)) == 0, np.inf, probs)),
    "negative": lambda ids, probs: (ids, -probs),
    "unnormalized": lambda ids, probs: (ids, probs * 3),
    "outside the vocabulary": lambda ids, probs: (ids + 10**6, probs),
    "negative id": lambda ids, probs: (ids - 10**6, probs),
    "repeated id": lambda ids, probs: (np.append(ids, ids[:1]), np.append(probs / 2, probs[:1] / 2)),
    "lengths differ": lambda ids, probs: (ids, np.append(probs, 0.0)),
    "empty": lambda ids, probs: (ids[:0], probs[:0]),
    "token not in its support": lambda ids, probs: (ids + 1000, probs),
}


@st.composite
def broken_distributions(draw, token: int) -> common_pb2.SparseDistribution:
    """A distribution for `token` broken in one way, or its bytes torn (not whole 4-byte values)."""
    good = draw(distributions(token))
    ids, probs = np.frombuffer(good.token_ids, "<i4").astype(np.int64), np.frombuffer(good.probs, "<f4")
    how = draw(st.sampled_from(sorted(BREAKS) + ["torn"]))
    if how == "torn":
        return common_pb2.SparseDistribution(token_ids=good.token_ids[:-1], probs=good.probs)
    return pack(*BREAKS[how](ids, probs))


@st.composite
def verify_items(draw, session: str, held: int) -> target_pb2.VerifyItem:
    """A Verify item for `session` (which holds `held` tokens), with up to two defects."""
    drafts = draw(st.lists(small_ids, max_size=4))
    sampling = draw(valid_sampling)
    sampled = sampling.temperature > 0
    valid = dict(
        session_id=session, prefix_len=held, tokens=[PROMPT[-1]], draft_tokens=drafts, sampling=sampling,
        draft_probs=[draw(distributions(t)) for t in drafts] if sampled and draw(st.booleans()) else [],
        uniforms=draw(st.lists(st.floats(0, 0.999), min_size=len(drafts) + 1, max_size=len(drafts) + 1)) if sampled else [],
    )
    wild = dict(
        session_id=wild_session_ids,
        prefix_len=st.one_of(st.integers(0, held + 3), UINT32),
        tokens=st.lists(st.one_of(small_ids, wild_token_ids), max_size=600),
        draft_tokens=st.one_of(st.lists(wild_token_ids, min_size=1, max_size=4), st.lists(small_ids, min_size=17, max_size=100_000)),
        sampling=wild_sampling,
        draft_probs=st.one_of(
            st.lists(distributions(drafts[0] if drafts else 0), max_size=6),
            st.tuples(*[st.one_of(distributions(t), broken_distributions(t)) for t in drafts]).map(list),
        ),
        uniforms=st.lists(wild_floats, max_size=8),
    )
    return target_pb2.VerifyItem(**with_defects(draw, valid, wild))


@st.composite
def propose_items(draw, session: str, held: int) -> draft_pb2.ProposeItem:
    """A Propose item for `session` (which holds `held` tokens), with up to two defects."""
    k = draw(st.integers(1, 4))
    sampling = draw(valid_sampling)
    valid = dict(
        session_id=session, prefix_len=draw(st.integers(0, held)), tokens=draw(st.lists(small_ids, min_size=1, max_size=3)),
        num_speculative_tokens=k, sampling=sampling,
        uniforms=draw(st.lists(st.floats(0, 0.999), min_size=k, max_size=k)) if sampling.temperature > 0 else [],
    )
    wild = dict(
        session_id=wild_session_ids,
        prefix_len=st.one_of(st.integers(held + 1, held + 3), UINT32),
        tokens=st.lists(st.one_of(small_ids, wild_token_ids), max_size=600),
        num_speculative_tokens=st.one_of(st.just(0), st.integers(17, 2**32 - 1)),
        sampling=wild_sampling,
        uniforms=st.lists(wild_floats, max_size=8),
        # torn or well-formed rows, to a drafter that reads none
        features=st.builds(common_pb2.Features, start=UINT32, rows=st.integers(0, 4), width=st.integers(0, 16), data=st.binary(max_size=128)),
    )
    return draft_pb2.ProposeItem(**with_defects(draw, valid, wild))


def batches(items: st.SearchStrategy, other: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly one item; else none, the same item twice, or an item beside one of an unknown session."""
    shapes = {
        "one": items.map(lambda item: [item]),
        "none": st.just([]),
        "twice": items.map(lambda item: [item, item]),
        "beside": st.tuples(items, other).map(list),
    }
    return st.sampled_from(["one", "one", "one", "none", "twice", "beside"]).flatmap(shapes.get)


@st.composite
def generate_requests(draw) -> orchestrator_pb2.GenerateRequest:
    """A GenerateRequest with up to two defects."""
    valid = dict(
        prompt=draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=60)), messages=[],
        max_new_tokens=draw(st.integers(1, 6)), temperature=draw(st.sampled_from([0.0, 0.7, 1.0])),
        top_p=draw(st.sampled_from([None, 0.9, 1.0])), top_k=draw(st.sampled_from([0, 20])),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**64 - 1))), stop=draw(st.lists(st.text(min_size=1, max_size=3), max_size=2)),
        num_speculative_tokens=draw(st.sampled_from([None, 0, 1, 4])),
    )
    chat = st.builds(orchestrator_pb2.ChatMessage, role=st.sampled_from(["user", "system", "assistant", "", "root"]), content=st.text(max_size=50))
    wild = dict(
        prompt=st.sampled_from(["", " a" * 600]),
        messages=st.lists(chat, max_size=3),
        max_new_tokens=st.one_of(st.integers(-2, 0), st.integers(4097, 2**31 - 1), st.integers(-(2**31), -1)),
        temperature=wild_floats,
        top_p=wild_floats,
        top_k=INT32,
        stop=st.one_of(st.lists(st.text(max_size=4), min_size=17, max_size=20), st.just([""])),
        num_speculative_tokens=st.one_of(st.integers(-1, 17), INT32),
    )
    fields = with_defects(draw, valid, wild)
    return orchestrator_pb2.GenerateRequest(**{name: value for name, value in fields.items() if value is not None})


# --- the orchestrator ----------------------------------------------------------------------------


@EXAMPLES
@given(request=generate_requests(), streamed=st.booleans())
def test_generate_answers_any_request_clearly(stack, stubs, request, streamed):
    orchestrator = stubs["orchestrator"]
    method = (lambda r, timeout: list(orchestrator.GenerateStream(r, timeout=timeout))) if streamed else orchestrator.Generate
    call(method, request)
    assert wait_for_sessions(stack) == (0, 0)


@pytest.mark.parametrize("size,code", [(MIB, grpc.StatusCode.INVALID_ARGUMENT), (17 * MIB, grpc.StatusCode.RESOURCE_EXHAUSTED)])
def test_megabyte_prompts(stubs, size, code):
    """A prompt far over the context is INVALID_ARGUMENT; one over the message limit (16 MiB) is
    refused by gRPC itself with RESOURCE_EXHAUSTED."""
    for request in (
        orchestrator_pb2.GenerateRequest(prompt="x" * size, max_new_tokens=4),
        orchestrator_pb2.GenerateRequest(messages=[orchestrator_pb2.ChatMessage(role="user", content="y" * size)], max_new_tokens=4),
    ):
        with pytest.raises(grpc.RpcError) as error:
            stubs["orchestrator"].Generate(request, timeout=60)
        assert error.value.code() == code
        assert_clear(error.value, request)


# --- the model services: sessions ----------------------------------------------------------------


@EXAMPLES
@given(
    which=st.sampled_from(["target", "draft"]),
    session_id=st.one_of(st.just("fresh"), wild_session_ids),
    prompt=st.one_of(
        st.lists(small_ids, min_size=1, max_size=8), st.lists(st.one_of(small_ids, wild_token_ids), max_size=8),
        st.lists(small_ids, min_size=500, max_size=600),
    ),
    repeat=st.booleans(),
    feature_layers=st.one_of(st.just([]), st.lists(st.one_of(st.integers(-3, 2), INT32), max_size=3)),
)
def test_start_session_answers_clearly_and_end_session_is_idempotent(stack, stubs, which, session_id, prompt, repeat, feature_layers):
    stub = stubs[which]
    request = common_pb2.StartSessionRequest(session_id=session_id, prompt_token_ids=prompt, feature_layers=feature_layers)
    started = call(stub.StartSession, request) is not None
    if repeat and started:
        with pytest.raises(grpc.RpcError) as reused:
            stub.StartSession(request, timeout=30)
        assert_clear(reused.value, request)
    ended = stub.EndSession(common_pb2.EndSessionRequest(session_id=session_id), timeout=30)
    assert ended.existed == started
    assert not stub.EndSession(common_pb2.EndSessionRequest(session_id=session_id), timeout=30).existed
    assert wait_for_sessions(stack) == (0, 0)


@pytest.mark.parametrize("which", ["target", "draft"])
def test_an_error_quoting_a_huge_session_id_stays_a_clear_status(stubs, which):
    """The unknown-session message quotes the id: 5,000 characters of it would overflow the
    client's 8 KiB metadata limit (RESOURCE_EXHAUSTED) unless the message is bounded."""
    item = dict(session_id="0" * 5000, prefix_len=0, tokens=[0], sampling=common_pb2.SamplingParams(top_p=1.0))
    if which == "target":
        request, method = target_pb2.VerifyRequest(items=[target_pb2.VerifyItem(**item)]), stubs["target"].Verify
    else:
        request, method = draft_pb2.ProposeRequest(items=[draft_pb2.ProposeItem(**item, num_speculative_tokens=1)]), stubs["draft"].Propose
    with pytest.raises(grpc.RpcError) as error:
        method(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and len(error.value.details()) <= 1000
    assert_clear(error.value, request)


@pytest.mark.parametrize("which", ["target", "draft"])
def test_megabyte_token_prompts_are_refused(stubs, which):
    """A million token ids is over any context; four million 5-byte varints (20 MB) are over the
    message limit."""
    for count, code in ((1_000_000, grpc.StatusCode.INVALID_ARGUMENT), (4_000_000, grpc.StatusCode.RESOURCE_EXHAUSTED)):
        request = common_pb2.StartSessionRequest(session_id="huge", prompt_token_ids=[10**9] * count)
        with pytest.raises(grpc.RpcError) as error:
            stubs[which].StartSession(request, timeout=60)
        assert error.value.code() == code
        assert_clear(error.value, request)


# --- the model services: Verify and Propose --------------------------------------------------------


class LiveSession:
    """A session started on the target and draft for one example, ended afterwards."""

    count = 0

    def __init__(self, stubs):
        LiveSession.count += 1
        self.id = f"live-{LiveSession.count}"
        self.stubs = stubs

    def __enter__(self) -> str:
        request = common_pb2.StartSessionRequest(session_id=self.id, prompt_token_ids=PROMPT)
        for which in ("target", "draft"):
            self.stubs[which].StartSession(request, timeout=30)
        return self.id

    def __exit__(self, *exc) -> None:
        for which in ("target", "draft"):
            self.stubs[which].EndSession(common_pb2.EndSessionRequest(session_id=self.id), timeout=30)


@EXAMPLES
@given(data=st.data())
def test_verify_answers_any_batch_clearly(stack, stubs, data):
    with LiveSession(stubs) as session:
        held = len(PROMPT) - 1
        items = data.draw(batches(verify_items(session, held), verify_items("someone-else", held)))
        call(stubs["target"].Verify, target_pb2.VerifyRequest(items=items))
    assert wait_for_sessions(stack) == (0, 0)


@EXAMPLES
@given(data=st.data())
def test_propose_answers_any_batch_clearly(stack, stubs, data):
    with LiveSession(stubs) as session:
        held = len(PROMPT)
        items = data.draw(batches(propose_items(session, held), propose_items("someone-else", held)))
        call(stubs["draft"].Propose, draft_pb2.ProposeRequest(items=items))
    assert wait_for_sessions(stack) == (0, 0)


def sampled_verify(session: str, distribution: common_pb2.SparseDistribution) -> target_pb2.VerifyRequest:
    item = target_pb2.VerifyItem(
        session_id=session, prefix_len=len(PROMPT) - 1, tokens=[PROMPT[-1]], draft_tokens=[5], draft_probs=[distribution],
        sampling=common_pb2.SamplingParams(temperature=1.0, top_p=1.0), uniforms=[0.5, 0.5],
    )
    return target_pb2.VerifyRequest(items=[item])


def dense(ids: np.ndarray, probs: np.ndarray) -> common_pb2.SparseDistribution:
    return common_pb2.SparseDistribution(token_ids=ids.astype("<i4").tobytes(), probs=probs.astype("<f4").tobytes())


def test_oversized_draft_distributions(stubs, vocab):
    """A support larger than the vocabulary repeats ids (INVALID_ARGUMENT); one over the message
    limit is refused by gRPC (RESOURCE_EXHAUSTED); the whole vocabulary, well-formed, is accepted."""
    whole = np.arange(vocab)
    over = np.arange(vocab + 1000) % vocab
    beyond_limit = np.zeros(3 * MIB)  # 3M ids + 3M probabilities = 24 MiB
    cases = [
        (dense(whole, np.full(vocab, 1 / vocab)), None),
        (dense(over, np.full(len(over), 1 / len(over))), grpc.StatusCode.INVALID_ARGUMENT),
        (dense(beyond_limit, beyond_limit), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ]
    for distribution, code in cases:
        with LiveSession(stubs) as session:
            request = sampled_verify(session, distribution)
            if code is None:
                assert stubs["target"].Verify(request, timeout=30).results[0].session_id == session
                continue
            with pytest.raises(grpc.RpcError) as error:
                stubs["target"].Verify(request, timeout=30)
            assert error.value.code() == code
            assert_clear(error.value, request)


# --- every RPC: bytes that are not the message ----------------------------------------------------

RPCS = [  # method, its form: a request or a stream of them in, a response or a stream of them out
    ("/specdec.v1.Orchestrator/Generate", "unary"),
    ("/specdec.v1.Orchestrator/GenerateStream", "server-streaming"),
    ("/specdec.v1.TargetService/GetModelInfo", "unary"),
    ("/specdec.v1.TargetService/StartSession", "unary"),
    ("/specdec.v1.TargetService/Verify", "unary"),
    ("/specdec.v1.TargetService/VerifyStream", "bidirectional"),
    ("/specdec.v1.TargetService/EndSession", "unary"),
    ("/specdec.v1.DraftService/GetModelInfo", "unary"),
    ("/specdec.v1.DraftService/StartSession", "unary"),
    ("/specdec.v1.DraftService/Propose", "unary"),
    ("/specdec.v1.DraftService/ProposeStream", "bidirectional"),
    ("/specdec.v1.DraftService/EndSession", "unary"),
]


def method_types(method: str):
    """The request and response message classes of a full method name."""
    _, service, name = method.split("/")
    files = (orchestrator_pb2, target_pb2, draft_pb2)
    descriptor = next(f.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]] for f in files if service.rsplit(".", 1)[1] in f.DESCRIPTOR.services_by_name)
    rpc = descriptor.methods_by_name[name]
    return message_factory.GetMessageClass(rpc.input_type), message_factory.GetMessageClass(rpc.output_type)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rpc=st.sampled_from(RPCS), payload=st.one_of(st.binary(max_size=64), st.just(b"\x0a\x02\xff\xfe")))
def test_undecodable_bytes_on_every_rpc(stack, rpc, payload):
    """Random bytes (invalid UTF-8 in a string field, truncated varints, unknown wire types): what
    does not decode as the request message is INVALID_ARGUMENT; what decodes is answered clearly,
    with a reply that parses as the response message."""
    method, form = rpc
    request_type, response_type = method_types(method)
    try:
        request_type.FromString(payload)
        decodable = True
    except DecodeError:
        decodable = False
    event("decodable" if decodable else "undecodable")
    which = {"Orchestrator": "orchestrator", "TargetService": "target", "DraftService": "draft"}[method.split("/")[1].rsplit(".", 1)[1]]
    with stack.channel(which) as channel:
        try:
            if form == "bidirectional":
                replies = list(channel.stream_stream(method)(iter([payload, payload]), timeout=30))
            elif form == "server-streaming":
                replies = list(channel.unary_stream(method)(payload, timeout=30))
            else:
                replies = [channel.unary_unary(method)(payload, timeout=30)]
        except grpc.RpcError as error:
            assert error.code() in CLEAR, f"{method}: {error.code().name}: {error.details()}"
            assert decodable or error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{method}: {error.code().name}"
            return
        assert decodable, f"{method} answered OK to bytes that are not a {request_type.DESCRIPTOR.name}"
        assert replies and all(isinstance(response_type.FromString(r), response_type) for r in replies)
        if method.endswith("/StartSession"):  # the bytes parsed into a valid request: end its session
            end = channel.unary_unary(method.replace("StartSession", "EndSession"))
            started = common_pb2.StartSessionRequest.FromString(payload)
            end(common_pb2.EndSessionRequest(session_id=started.session_id).SerializeToString(), timeout=30)
