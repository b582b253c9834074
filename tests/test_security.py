"""Transport security and limits against the real services (tiny models, in-process): generation
over mutual TLS from the application to the orchestrator to target and draft; model services that
refuse clients without a certificate, plaintext clients and clients trusting another CA; an
oversized message and calls beyond --max-concurrent-rpcs end RESOURCE_EXHAUSTED. (Bearer tokens:
tests/test_services.py::test_bearer_token_authentication.)"""

from __future__ import annotations

import shutil
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from draft_service.drafters.model import ModelDrafter
from harness.inprocess import start_stack
from harness.tiny import with_eos
from specdec.rpc.tls import channel_credentials, server_credentials
from specdec.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, target_pb2_grpc
from tests.helpers import make_certificates

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")

PROMPT = "Once upon a time, in a land far away,"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def mtls_stack(tiny_target, certificates):
    """Every hop over TLS: the model services require the orchestrator's client certificate
    (mutual TLS); the orchestrator's own port serves TLS to applications."""
    target = with_eos(tiny_target, ())
    model_services = dict(
        tls_cert_file=certificates.server_cert, tls_key_file=certificates.server_key, tls_client_ca_file=certificates.ca
    )
    running = start_stack(
        target,
        ModelDrafter(target),
        model_service_options=model_services,
        upstream_tls_ca_file=certificates.ca,
        upstream_tls_cert_file=certificates.client_cert,
        upstream_tls_key_file=certificates.client_key,
        tls_cert_file=certificates.server_cert,
        tls_key_file=certificates.server_key,
    )
    yield running
    running.stop()


def target_info(address: str, credentials: grpc.ChannelCredentials | None) -> common_pb2.ModelInfo:
    """GetModelInfo from the target at `address`, over TLS with `credentials`, else plaintext."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return target_pb2_grpc.TargetServiceStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10)


@pytest.mark.slow  # openssl makes the certificates
def test_generation_over_mutual_tls_end_to_end(mtls_stack, certificates):
    credentials = channel_credentials(certificates.ca)
    with grpc.secure_channel(mtls_stack.address("orchestrator"), credentials) as channel:
        reply = orchestrator_pb2_grpc.OrchestratorStub(channel).Generate(
            orchestrator_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=12, num_speculative_tokens=3), timeout=60
        )
    assert reply.stats.generated_tokens == 12
    assert reply.stats.accepted_tokens > 0  # the draft took part, over its own mutual-TLS channel


@pytest.mark.slow  # openssl makes the certificates
def test_model_service_accepts_only_clients_with_a_certificate_from_its_ca(mtls_stack, certificates):
    address = mtls_stack.address("target")
    client = channel_credentials(certificates.ca, certificates.client_cert, certificates.client_key)
    assert target_info(address, client).model
    refused = {
        "no client certificate": channel_credentials(certificates.ca),
        "plaintext": None,
        "server certificate checked against another CA": channel_credentials(
            certificates.other_ca, certificates.client_cert, certificates.client_key
        ),
    }
    for case, credentials in refused.items():
        with pytest.raises(grpc.RpcError) as error:
            target_info(address, credentials)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, case


@pytest.mark.slow  # openssl makes the certificates
def test_client_certificate_from_another_ca_is_rejected(certificates):
    """A server whose client CA is `other_ca` refuses the client certificate `ca` signed."""
    from harness.loop import LoopThread
    from specdec.rpc.server import ServerOptions, create_server

    credentials = server_credentials(certificates.server_cert, certificates.server_key, certificates.other_ca)
    options = ServerOptions(credentials=credentials)
    loop = LoopThread()

    async def serve():
        server = create_server("127.0.0.1:0", lambda _: None, ("specdec.v1.TargetService",), options)
        await server.start()
        return server

    server = loop.run(serve())
    try:
        credentials = channel_credentials(certificates.ca, certificates.client_cert, certificates.client_key)
        with grpc.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel, pytest.raises(grpc.RpcError) as error:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        loop.run(server.stop(0))
        loop.close()


@pytest.mark.slow  # openssl makes the certificates
def test_half_configured_tls_is_refused_at_start_up(certificates):
    with pytest.raises(ValueError, match="go together"):
        server_credentials(certificates.server_cert, "")
    with pytest.raises(ValueError, match="client CA"):
        server_credentials("", "", certificates.ca)
    with pytest.raises(ValueError, match="go together"):
        channel_credentials(certificates.ca, certificates.client_cert, "")


# Limits ----------------------------------------------------------------------------------------

MAX_CONCURRENT_RPCS = 2


@pytest.fixture(scope="module")
def limited_stack(tiny_target):
    """Target-only; the orchestrator takes messages up to 1 MiB and serves 2 calls at once."""
    running = start_stack(with_eos(tiny_target, ()), max_message_mb=1, max_concurrent_rpcs=MAX_CONCURRENT_RPCS)
    yield running
    running.stop()


def test_oversized_message_is_resource_exhausted(limited_stack):
    with limited_stack.channel("orchestrator") as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(orchestrator_pb2.GenerateRequest(prompt="x" * (1 << 20), max_new_tokens=1), timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reply = stub.Generate(orchestrator_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=2), timeout=30)
        assert reply.stats.generated_tokens == 2


def test_calls_beyond_max_concurrent_rpcs_are_resource_exhausted(limited_stack):
    """Health Watch streams stay open as long as the client wants: they hold the call slots
    deterministically (and show that health checks count against the limit)."""
    generate = orchestrator_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=2)
    with limited_stack.channel("orchestrator") as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        watches = [health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()) for _ in range(MAX_CONCURRENT_RPCS)]
        try:
            for watch in watches:
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # the call is running
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(generate, timeout=30)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            for watch in watches:
                watch.cancel()
        assert generate_once_slots_free(stub, generate).stats.generated_tokens == 2


def generate_once_slots_free(stub, request, timeout_s: float = 10.0):
    """Generate, retried while RESOURCE_EXHAUSTED: the server frees a cancelled call's slot a
    moment after the client cancelled it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return stub.Generate(request, timeout=30)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
        time.sleep(0.05)
