"""The three services as separate hosts: the target and the draft each run in a network namespace
of their own, reachable only over a veth link with its own address, and the orchestrator (in the
test's namespace) reaches them by those addresses. Nothing is shared but the network, as between
machines. The test creates the namespaces and links itself and removes them afterwards; it skips
where `ip netns` is not allowed (no root, no CAP_NET_ADMIN, no iproute2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest

from harness.probes import free_port, wait_serving
from harness.processes import ROOT
from harness.tiny import save_tiny_model
from specdec.v1 import orchestrator_pb2, orchestrator_pb2_grpc

pytestmark = pytest.mark.slow  # service processes in network namespaces

HOSTS = {"target": "10.231.1", "draft": "10.231.2"}  # a /24 per link: .1 our side, .2 the service's
PORTS = {"target": 50051, "draft": 50052}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def namespaces_allowed() -> str | None:
    """None if this process may create network namespaces, else why not."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"specdec-probe-{uuid.uuid4().hex[:6]}"
    try:
        ip("netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        return f"`ip netns add` is not allowed here: {getattr(error, 'stderr', b'').decode().strip()}"
    ip("netns", "delete", probe)
    return None


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Namespace name per service, each linked to ours by a veth pair; removed at the end."""
    reason = namespaces_allowed()
    if reason:
        pytest.skip(reason)
    suffix = uuid.uuid4().hex[:6]
    created = {}
    try:
        for service, net in HOSTS.items():
            namespace, ours, theirs = f"specdec-{service}-{suffix}", f"sd{service[0]}{suffix}a", f"sd{service[0]}{suffix}b"
            ip("netns", "add", namespace)
            created[service] = namespace
            ip("link", "add", ours, "type", "veth", "peer", "name", theirs)
            ip("link", "set", theirs, "netns", namespace)
            ip("addr", "add", f"{net}.1/24", "dev", ours)
            ip("link", "set", ours, "up")
            ip("netns", "exec", namespace, "ip", "addr", "add", f"{net}.2/24", "dev", theirs)
            ip("netns", "exec", namespace, "ip", "link", "set", theirs, "up")
            ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        yield created
    finally:
        for namespace in created.values():
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, timeout=10)  # takes its veth pair along


def spawn(namespace: str | None, module: str, *args: str, log: Path) -> subprocess.Popen:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    with open(log, "w") as out:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", module, *args],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT,
        )


def test_services_on_separate_network_hosts_give_the_exact_output(hosts, tmp_path):
    model = str(save_tiny_model(tmp_path / "tiny"))
    processes = []
    try:
        for service, module in (("target", "target_service"), ("draft", "draft_service")):
            address = f"{HOSTS[service]}.2"
            processes.append(
                spawn(hosts[service], module, "--host", address, "--port", str(PORTS[service]), "--model", model, log=tmp_path / f"{service}.log")
            )
        orchestrator_port = free_port()
        processes.append(
            spawn(
                None, "orchestrator", "--port", str(orchestrator_port), "--tokenizer", model,
                "--target", f"{HOSTS['target']}.2:{PORTS['target']}", "--draft", f"{HOSTS['draft']}.2:{PORTS['draft']}",
                log=tmp_path / "orchestrator.log",
            )
        )
        address = f"127.0.0.1:{orchestrator_port}"
        wait_serving(address, processes[-1], 180, tmp_path / "orchestrator.log")
        with grpc.insecure_channel(address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            outputs = {
                k: stub.Generate(orchestrator_pb2.GenerateRequest(prompt="Across the wire", max_new_tokens=20, num_speculative_tokens=k), timeout=120)
                for k in (0, 3)
            }
        assert list(outputs[3].token_ids) == list(outputs[0].token_ids)
        assert outputs[3].stats.draft_tokens > 0  # the draft in its own namespace was reached
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
