"""The Python client library (specdec_client) against the real services (tiny models, in-process):
typed results equal across Generate, GenerateStream, sync and asyncio; request options reach the
server (unset stays unset); errors carry their status and the field at fault; a bearer token and
TLS; leaving a stream early frees the sessions."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil

import grpc
import pytest

from draft_service.drafters.model import ModelDrafter
from harness.inprocess import start_stack
from harness.probes import wait_for_sessions
from harness.tiny import with_eos
from specdec.rpc.tls import server_credentials
from specdec.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from specdec_client import AsyncClient, Client, Completion, Request, RequestError, Stats
from tests.helpers import make_certificates

TOKEN = "client-test-token"
PROMPT = "Once upon a time, in a land far away,"


@pytest.fixture(scope="module")
def stack(tiny_target, tmp_path_factory):
    """Draft = the target's own model; the orchestrator requires TOKEN."""
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    target = with_eos(tiny_target, ())
    # a fixed default K, so that a request without K reports it (adaptive K would report the K it used)
    running = start_stack(target, ModelDrafter(target), auth_token_file=str(tokens), adaptive_k=False)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.address("orchestrator"), token=TOKEN, timeout=60) as client:
        yield client


def test_generate_equals_the_stream_and_both_are_typed(client):
    request = Request(prompt=PROMPT, max_new_tokens=12, num_speculative_tokens=3)
    completion = client.generate(request)
    deltas = list(client.generate_stream(request))
    assert isinstance(completion, Completion) and completion.finish_reason == "length"
    assert "".join(d.text for d in deltas) == completion.text
    assert tuple(t for d in deltas for t in d.token_ids) == completion.token_ids and len(completion.token_ids) == 12
    assert all(d.finish_reason is None and d.stats is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason == "length" and isinstance(last.stats, Stats)
    stats = completion.stats
    assert stats.generated_tokens == 12 and stats.num_speculative_tokens == 3
    assert 0 < stats.accepted_tokens <= stats.draft_tokens and isinstance(stats.accepted_per_position, tuple)
    assert client.generate(PROMPT).stats.num_speculative_tokens == 4  # a bare string: the server's default K


def test_stats_carry_every_field_of_the_protocol():
    assert {f.name for f in dataclasses.fields(Stats)} == set(orchestrator_pb2.GenerationStats.DESCRIPTOR.fields_by_name)
    assert {f.name for f in dataclasses.fields(Request)} == set(orchestrator_pb2.GenerateRequest.DESCRIPTOR.fields_by_name)


def test_options_reach_the_server(client):
    messages = [("system", "Be brief."), {"role": "user", "content": "Hi"}]
    chat = Request(messages=messages, max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=20, seed=7)
    first, second = client.generate(chat), client.generate(chat)
    assert first.token_ids == second.token_ids  # seeded sampling is reproducible
    target_only = client.generate(Request(prompt=PROMPT, max_new_tokens=4, num_speculative_tokens=0))
    assert target_only.stats.draft_tokens == 0  # 0 is sent, not taken for "unset"
    plain = client.generate(Request(prompt=PROMPT, max_new_tokens=20))
    stop = plain.text[5:8]
    stopped = client.generate(Request(prompt=PROMPT, max_new_tokens=20, stop=["never in the output", stop]))
    assert (stopped.finish_reason, stopped.text) == ("stop", plain.text[: plain.text.index(stop)])


def test_errors_name_the_status_and_the_field(stack, client):
    with pytest.raises(RequestError) as raised:
        client.generate(Request(prompt=PROMPT, max_new_tokens=0))
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in raised.value.field_violations] == ["max_new_tokens"]
    with pytest.raises(RequestError) as raised:
        list(client.generate_stream(Request(prompt=PROMPT, top_p=1.5)))
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and raised.value.field_violations[0].field == "top_p"
    with pytest.raises(RequestError) as raised:
        client.generate(Request(prompt=PROMPT, max_new_tokens=400), timeout=0.05)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with Client(stack.address("orchestrator")) as anonymous, pytest.raises(RequestError) as raised:
        anonymous.generate(PROMPT)
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_leaving_a_stream_early_frees_the_sessions(stack, client):
    for delta in client.generate_stream(Request(prompt=PROMPT, max_new_tokens=400)):
        if delta.token_ids:
            break
    assert wait_for_sessions(stack) == (0, 0)


def test_async_client_matches_the_sync_client_with_concurrent_requests(stack, client):
    request = Request(prompt=PROMPT, max_new_tokens=10)
    expected = client.generate(request)

    async def run():
        async with AsyncClient(stack.address("orchestrator"), token=TOKEN, timeout=60) as aclient:

            async def streamed():
                return [delta async for delta in aclient.generate_stream(request)]

            whole, deltas = await asyncio.gather(aclient.generate(request), streamed())
            with pytest.raises(RequestError) as raised:
                await aclient.generate(Request(prompt=PROMPT, max_new_tokens=0))
            return whole, deltas, raised.value

    whole, deltas, error = asyncio.run(run())
    assert (whole.text, whole.token_ids) == (expected.text, expected.token_ids)
    assert "".join(d.text for d in deltas) == expected.text and deltas[-1].stats.generated_tokens == 10
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field_violations[0].field == "max_new_tokens"


@pytest.mark.slow  # openssl makes the certificate
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_with_custom_root_certificates(stack, tmp_path):
    """The orchestrator's servicer behind a TLS port, with a certificate for 127.0.0.1 from a test CA."""
    certificates = make_certificates(tmp_path)
    credentials = server_credentials(certificates.server_cert, certificates.server_key)

    async def serve_tls():
        server = grpc.aio.server()
        orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(stack.orchestrator.servicer, server)
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        return server, port

    server, port = stack.loop.run(serve_tls())
    try:
        with Client(f"127.0.0.1:{port}", root_certificates=certificates.ca, timeout=60) as secure:
            assert secure.generate(Request(prompt=PROMPT, max_new_tokens=3)).finish_reason == "length"
        with Client(f"127.0.0.1:{port}", timeout=5) as plaintext, pytest.raises(RequestError) as raised:
            plaintext.generate(PROMPT)
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        stack.loop.run(server.stop(0))
