"""The CPU image and the CPU Compose stack, for real: `make images` builds the image (docker where
its engine runs, else podman), the Compose file starts two targets, two drafts and the orchestrator
as containers on their own network, and from the host: every container reports SERVING over gRPC
health and passes its own health check, a streamed generation through the published orchestrator
port equals target-only decoding, it stays equal once both drafts are stopped (the orchestrator
falls back), and on SIGTERM every container exits 0 within the grace period. The stack, its
network and its volume are removed afterwards, even on failure.

The image is built the way that needs no container registry (docker/README.md): a Debian base made
with mmdebstrap from a Debian mirror, torch from PyPI. SPECDEC_TEST_BASE_IMAGE and
SPECDEC_TEST_TORCH_INDEX choose others (the Dockerfile's public defaults, say).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.probes import free_port
from specdec.v1 import orchestrator_pb2, orchestrator_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # builds an image (minutes), runs five containers

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker" / "compose.cpu.yaml"
IMAGE = "localhost/specdec:cpu-test"
GRACE_S = 30  # the Compose file's stop_grace_period
PROMPT = "Explain why the sky is blue."
PORTS = {"target": 50051, "draft": 50052, "orchestrator": 50050}


def container_engine() -> tuple[str, list[str]] | None:
    """(engine, compose command) as the Makefile picks them (docker where its engine runs, else
    podman), or None where neither runs."""
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return "docker", ["docker", "compose"]
    if shutil.which("podman") and shutil.which("podman-compose"):
        return "podman", ["podman-compose"]
    return None


def run(command: list[str], timeout: float, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}")
    return result


class Stack:
    """One Compose project of the CPU file, under a name of its own."""

    def __init__(self, engine: str, compose: list[str]):
        self.engine, self.project = engine, f"specdec-test-{os.getpid()}"
        self.grpc_port, self.http_port = free_port(), free_port()
        self.env = {**os.environ, "SPECDEC_IMAGE": IMAGE, "CONTAINERS_CONF": str(ROOT / "docker" / "podman" / "containers.conf"),
                    "SPECDEC_PUBLISH_GRPC_PORT": str(self.grpc_port), "SPECDEC_PUBLISH_HTTP_PORT": str(self.http_port)}
        self.compose = [*compose, "-p", self.project, "-f", str(COMPOSE_FILE)]

    def containers(self) -> dict[str, str]:
        """Container name -> its service (target, draft, orchestrator)."""
        listed = run([self.engine, "ps", "-a", "--filter", f"label=com.docker.compose.project={self.project}", "--format", "{{.Names}}"],
                     60, self.env).stdout.split()
        # podman-compose names them project_service_N, docker compose project-service-N
        return {name: re.fullmatch(rf"{re.escape(self.project)}[_-]([a-z]+)[_-]\d+", name).group(1) for name in listed}

    def host_address(self, container: str, service: str) -> str:
        published = run([self.engine, "port", container, f"{PORTS[service]}/tcp"], 60, self.env).stdout.split()[0]
        return f"127.0.0.1:{published.rsplit(':', 1)[1]}"

    def inspect(self, container: str) -> dict:
        return json.loads(run([self.engine, "inspect", container], 60, self.env).stdout)[0]

    def health_check_passes(self, container: str) -> bool:
        """Run the container's health check now: podman without systemd never runs it by itself,
        and docker's runs on its interval (then wait for its verdict)."""
        if self.engine == "podman":
            return run(["podman", "healthcheck", "run", container], 60, self.env, check=False).returncode == 0
        deadline = time.monotonic() + 60
        while (status := self.inspect(container)["State"]["Health"]["Status"]) == "starting" and time.monotonic() < deadline:
            time.sleep(2)
        return status == "healthy"

    def logs(self) -> str:
        tails = {name: run([self.engine, "logs", "--tail", "30", name], 60, self.env, check=False) for name in self.containers()}
        return "\n".join(f"--- {name}\n{tail.stdout}{tail.stderr}" for name, tail in tails.items())

    def down(self) -> None:
        run([*self.compose, "down", "-v"], 300, self.env, check=False)
        for name in self.containers():  # whatever compose left behind
            run([self.engine, "rm", "-f", name], 120, self.env, check=False)
        run([self.engine, "volume", "rm", "-f", f"{self.project}_cache"], 60, self.env, check=False)
        run([self.engine, "network", "rm", "-f", f"{self.project}_default"], 60, self.env, check=False)  # podman-compose 1.0.3 keeps it


@pytest.fixture(scope="module")
def image():
    found = container_engine()
    if found is None:
        pytest.skip("no container engine (make container-engine installs podman where apt-get runs as root)")
    base = os.environ.get("SPECDEC_TEST_BASE_IMAGE", "localhost/debian-base:bookworm")
    torch_index = os.environ.get("SPECDEC_TEST_TORCH_INDEX", "")
    started = time.monotonic()
    run(["make", "images", f"BASE_IMAGE={base}", f"TORCH_INDEX={torch_index}", f"SPECDEC_IMAGE={IMAGE}"], 3600)
    print(f"make images: {time.monotonic() - started:.0f} s")
    return found


@pytest.fixture(scope="module")
def stack(image):
    stack = Stack(*image)
    try:
        run([*stack.compose, "up", "-d"], 600, stack.env)
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.down()


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def generate(address: str, num_speculative_tokens: int) -> tuple[list[int], orchestrator_pb2.GenerateResponse]:
    request = orchestrator_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=32, ignore_eos=True,
                                               num_speculative_tokens=num_speculative_tokens)
    tokens, last = [], None
    with grpc.insecure_channel(address) as channel:
        for message in orchestrator_pb2_grpc.OrchestratorStub(channel).GenerateStream(request, timeout=300):
            tokens += message.token_ids
            last = message
    return tokens, last


def test_compose_stack_serves_exact_output_falls_back_and_stops_cleanly(stack):
    containers = stack.containers()
    assert sorted(containers.values()) == ["draft", "draft", "orchestrator", "target", "target"], containers
    addresses = {name: stack.host_address(name, service) for name, service in containers.items()}
    deadline = time.monotonic() + 900  # the health checks' start period: model loading, one-time conversion
    while not all(serving(address) for address in addresses.values()):
        exited = [name for name in containers if stack.inspect(name)["State"]["Status"] == "exited"]
        assert not exited and time.monotonic() < deadline, f"not SERVING: exited {exited}\n{stack.logs()}"
        time.sleep(3)

    for name in containers:  # each container's own health check (Compose's test) passes inside it
        assert stack.health_check_passes(name), name

    orchestrator = f"127.0.0.1:{stack.grpc_port}"
    reference, _ = generate(orchestrator, num_speculative_tokens=0)
    speculative, last = generate(orchestrator, num_speculative_tokens=4)
    assert len(reference) == 32 and speculative == reference
    assert last.stats.draft_tokens > 0, "the drafts were used"

    drafts = [name for name, service in containers.items() if service == "draft"]
    run([stack.engine, "stop", "-t", str(GRACE_S), *drafts], 120, stack.env)
    fallen_back, last = generate(orchestrator, num_speculative_tokens=4)
    assert fallen_back == reference and last.stats.draft_tokens == 0

    running = [name for name in containers if name not in drafts]
    started = time.monotonic()
    run([stack.engine, "stop", "-t", str(GRACE_S), *running], 300, stack.env)  # SIGTERM, SIGKILL after GRACE_S
    stopped_s = time.monotonic() - started
    codes = {name: stack.inspect(name)["State"]["ExitCode"] for name in containers}
    assert codes == dict.fromkeys(containers, 0), codes
    assert stopped_s < GRACE_S, f"the stack took {stopped_s:.0f} s to stop"
