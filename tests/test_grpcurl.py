"""grpcurl, an independent Go client driven by JSON, against the real orchestrator (tiny models):
every example in docs/grpcurl.md runs, and the answers through the protoset and through server
reflection equal what the Python client gets."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from draft_service.drafters.ngram import NGramDrafter
from harness.inprocess import start_stack
from harness.tiny import with_eos
from specdec_client import Client, Request

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "grpcurl.md"
DOC_ADDRESS = "127.0.0.1:50050"
GRPCURL = os.environ.get("SPECDEC_GRPCURL", "")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not GRPCURL, reason="grpcurl is installed by `make tools`; `make test` sets SPECDEC_GRPCURL")]  # grpcurl processes


@pytest.fixture(scope="module")
def stack(tiny_target):
    running = start_stack(with_eos(tiny_target, ()), NGramDrafter())
    yield running
    running.stop()


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GRPCURL, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def messages(output: str) -> list[dict]:
    """The JSON messages grpcurl printed one after another, with snake_case keys."""
    decoder, found, rest = json.JSONDecoder(), [], output.strip()
    while rest:
        message, used = decoder.raw_decode(rest)
        found.append(snake_case(message))
        rest = rest[used:].lstrip()
    return found


def snake_case(message):
    """JSON keys as the proto names: grpcurl prints lowerCamelCase names from the protoset's
    descriptors but the proto names from those that Python's server reflection sends."""
    if isinstance(message, dict):
        return {re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower(): snake_case(value) for key, value in message.items()}
    if isinstance(message, list):
        return [snake_case(value) for value in message]
    return message


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.M | re.S)


def test_every_documented_example_runs(stack):
    blocks = sh_blocks(DOC.read_text())
    assert len(blocks) >= 4
    env = {**os.environ, "PATH": f"{Path(GRPCURL).parent}{os.pathsep}{os.environ['PATH']}", "SPECDEC_TOKEN": "unused-here"}
    for block in blocks:
        script = block.replace(DOC_ADDRESS, stack.address("orchestrator"))
        result = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{block}\n{result.stderr}"


@pytest.mark.parametrize("schema", [["-protoset", "protos/specdec.protoset"], []], ids=["protoset", "reflection"])
def test_generate_and_stream_equal_the_python_client(stack, schema):
    address = stack.address("orchestrator")
    body = json.dumps({"prompt": "Once upon a time", "max_new_tokens": 12, "num_speculative_tokens": 3})
    with Client(address, timeout=60) as client:
        expected = client.generate(Request(prompt="Once upon a time", max_new_tokens=12, num_speculative_tokens=3))
    unary = grpcurl("-plaintext", *schema, "-d", body, address, "specdec.v1.Orchestrator/Generate")
    assert unary.returncode == 0, unary.stderr
    [whole] = messages(unary.stdout)
    assert whole["text"] == expected.text and tuple(whole["token_ids"]) == expected.token_ids
    assert whole["finish_reason"] == "FINISH_REASON_LENGTH" and whole["stats"]["generated_tokens"] == 12
    streamed = grpcurl("-plaintext", *schema, "-d", body, address, "specdec.v1.Orchestrator/GenerateStream")
    assert streamed.returncode == 0, streamed.stderr
    deltas = messages(streamed.stdout)
    assert "".join(d.get("text", "") for d in deltas) == expected.text
    assert deltas[-1]["finish_reason"] == "FINISH_REASON_LENGTH" and all("finish_reason" not in d for d in deltas[:-1])


def test_a_bad_field_is_named_in_the_error(stack):
    body = '{"prompt": "Hello", "max_new_tokens": 0}'
    result = grpcurl("-plaintext", "-d", body, stack.address("orchestrator"), "specdec.v1.Orchestrator/Generate")
    assert result.returncode == 64 + 3  # grpcurl: 64 + the status code (INVALID_ARGUMENT = 3)
    assert "Code: InvalidArgument" in result.stderr and '"field": "max_new_tokens"' in result.stderr
