"""The Go client (clients/go), built from protos/ with `go build`, against the real orchestrator
(tiny models): it streams the same answer the Python client gets, sends its bearer token and
reports errors by status; and its committed generated code is what clients/go/generate.py makes."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from draft_service.drafters.ngram import NGramDrafter
from harness.inprocess import start_stack
from harness.tiny import with_eos
from specdec_client import Client, Request

pytestmark = pytest.mark.slow  # go build and the Go client

ROOT = Path(__file__).resolve().parent.parent
GO_CLIENT = ROOT / "clients" / "go"
TOKEN = "go-client-token"

spec = importlib.util.spec_from_file_location("generate_go", GO_CLIENT / "generate.py")
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)

needs_go = pytest.mark.skipif(shutil.which("go") is None, reason="needs the Go toolchain (`make test` needs it for ghz too)")


@pytest.mark.skipif(
    not (os.environ.get("SPECDEC_PROTOC_GEN_GO") and os.environ.get("SPECDEC_PROTOC_GEN_GO_GRPC")),
    reason="the pinned protoc plugins are installed by `make tools`; `make test` sets SPECDEC_PROTOC_GEN_GO(_GRPC)",
)
def test_generated_go_code_is_up_to_date(tmp_path):
    generate.generate(tmp_path)
    stale = [str(p) for p in generate.GENERATED if (tmp_path / p).read_bytes() != (GO_CLIENT / p).read_bytes()]
    assert not stale, f"regenerate with `python clients/go/generate.py`: {stale}"


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    out = tmp_path_factory.mktemp("go") / "specdec-client"
    # -mod=readonly: the build must succeed from the committed go.mod and go.sum alone
    result = subprocess.run(
        ["go", "build", "-mod=readonly", "-o", str(out), "."], cwd=GO_CLIENT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def stack(tiny_target, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    # a fixed default K, so that a request without K reports it (adaptive K would report the K it used)
    running = start_stack(with_eos(tiny_target, ()), NGramDrafter(), auth_token_file=str(tokens), adaptive_k=False)
    yield running
    running.stop()


def run_client(binary, stack, *args: str) -> subprocess.CompletedProcess:
    command = [str(binary), "-address", stack.address("orchestrator"), "-timeout", "60s", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@needs_go
def test_go_client_streams_the_answer(binary, stack):
    with Client(stack.address("orchestrator"), token=TOKEN, timeout=60) as client:
        expected = client.generate(Request(prompt="Once upon a time", max_new_tokens=12, num_speculative_tokens=3))
        chat = client.generate(Request(messages=[("user", "Hi")], max_new_tokens=5))
    result = run_client(binary, stack, "-token", TOKEN, "-max-new-tokens", "12", "-k", "3", "Once upon a time")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.text + "\n"
    assert "finish=length tokens=12 K=3 " in result.stderr
    result = run_client(binary, stack, "-token", TOKEN, "-chat", "-max-new-tokens", "5", "Hi")
    assert result.returncode == 0 and result.stdout == chat.text + "\n"
    assert "K=4 " in result.stderr  # -k left at -1: the server's default


@needs_go
def test_go_client_reports_errors_by_status(binary, stack):
    result = run_client(binary, stack, "-max-new-tokens", "4", "Hello")
    assert result.returncode == 1 and result.stderr.startswith("error: Unauthenticated: ")
    result = run_client(binary, stack, "-token", TOKEN, "-max-new-tokens", "0", "Hello")
    assert result.returncode == 1 and result.stderr.startswith("error: InvalidArgument: max_new_tokens")
