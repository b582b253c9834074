"""The OpenAI-compatible HTTP API (orchestrator/openai_api/) against the real services (tiny models,
in-process), with the official `openai` client: chat and completions, unary and streamed, greedy
output with speculation equal to target-only output and to the gRPC API's, usage, stop strings,
seeds; errors in OpenAI's shape naming the parameter; bearer tokens and TLS; 503 before the model
services are ready and while draining; a client that disconnects frees both sessions; and every
curl example of docs/http-api.md. One file (over 450 lines) because its tests share two running
stacks, which take seconds each to start."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from prometheus_client import REGISTRY

from draft_service.drafters.model import ModelDrafter
from harness.inprocess import start_stack
from harness.loop import LoopThread
from harness.probes import free_port, wait_for_sessions
from harness.tiny import with_eos
from orchestrator import server as orchestrator_server
from specdec.chat import chat_token_ids
from specdec.v1 import orchestrator_pb2, orchestrator_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "http-api.md"
PROMPT = "Once upon a time, in a land far away,"
CHAT = [{"role": "user", "content": "Tell me a story."}]
MODEL = "tiny-target"  # the served name: the target's


@pytest.fixture(scope="module")
def stack(tiny_target):
    """The tiny target served with itself as the draft (every draft accepted), HTTP on."""
    target = with_eos(tiny_target, ())
    running = start_stack(target, ModelDrafter(target), http_port=free_port())
    yield running
    running.stop()


def base_url(stack, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{stack.orchestrator.http_port}/v1"


@pytest.fixture(scope="module")
def client(stack):
    with openai.OpenAI(base_url=base_url(stack), api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def get(stack, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", stack.orchestrator.http_port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def chat(client, k: int | None = None, **fields):
    fields = {"model": MODEL, "messages": CHAT, "max_tokens": 20, "temperature": 0, **fields}
    if k is not None:
        fields.setdefault("extra_body", {})["num_speculative_tokens"] = k
    return client.chat.completions.create(**fields)


def complete(client, k: int | None = None, **fields):
    fields = {"model": MODEL, "prompt": PROMPT, "max_tokens": 20, "temperature": 0, **fields}
    if k is not None:
        fields.setdefault("extra_body", {})["num_speculative_tokens"] = k
    return client.completions.create(**fields)


def test_chat_greedy_with_speculation_equals_target_only_unary_and_streamed(stack, client, tokenizer):
    baseline = chat(client, k=0)
    speculative = chat(client, k=3)
    assert speculative.choices[0].message.content == baseline.choices[0].message.content
    assert baseline.choices[0].message.role == "assistant" and baseline.object == "chat.completion"
    assert baseline.model == MODEL and baseline.id.startswith("chatcmpl-")
    assert speculative.choices[0].finish_reason == "length"  # the tiny target has no EOS here
    prompt_tokens = len(chat_token_ids(tokenizer, CHAT))
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 20, "total_tokens": prompt_tokens + 20}
    assert speculative.usage.model_dump(exclude_none=True) == usage
    stats = speculative.model_extra["specdec_stats"]
    assert stats["acceptance_rate"] == 1.0 and stats["num_speculative_tokens"] == 3 and stats["generated_tokens"] == 20
    assert stats["tokens_per_target_forward"] > 1 and stats["target_forward_passes"] < 20
    assert baseline.model_extra["specdec_stats"]["target_forward_passes"] == 20
    assert set(stats) == {f.name for f in orchestrator_pb2.GenerationStats.DESCRIPTOR.fields}

    chunks = list(chat(client, k=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == baseline.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert finish[0].model_extra["specdec_stats"]["acceptance_rate"] == 1.0
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(exclude_none=True) == usage
    assert all(c.usage is None for c in chunks[:-1]) and {c.object for c in chunks} == {"chat.completion.chunk"}


def test_completions_greedy_with_speculation_equals_target_only_and_the_grpc_api(stack, client, tokenizer):
    baseline = complete(client, k=0)
    assert complete(client, k=4).choices[0].text == baseline.choices[0].text
    assert baseline.object == "text_completion" and baseline.choices[0].finish_reason == "length"
    assert baseline.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids) and baseline.usage.completion_tokens == 20
    with stack.channel("orchestrator") as channel:
        grpc_answer = orchestrator_pb2_grpc.OrchestratorStub(channel).Generate(
            orchestrator_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=20), timeout=60
        )
    assert grpc_answer.text == baseline.choices[0].text

    chunks = list(complete(client, k=4, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == baseline.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length" and all(c.usage is None for c in chunks)
    # without max_tokens a completion is OpenAI's 16 tokens long; a chat runs to the context's end
    assert complete(client, max_tokens=None).usage.completion_tokens == 16
    assert chat(client, k=8, max_tokens=None).usage.total_tokens == stack.orchestrator.servicer.engine.target_info.max_context


def test_stop_strings_seeds_and_no_op_parameters(client):
    baseline = complete(client, max_tokens=30).choices[0].text
    stop = baseline[len(baseline) // 2 :][:3]
    stopped = complete(client, max_tokens=30, stop=stop)
    assert stopped.choices[0].text == baseline[: baseline.index(stop)] and stopped.choices[0].finish_reason == "stop"
    assert complete(client, max_tokens=30, stop=[stop, "\x00never"]).choices[0].text == stopped.choices[0].text

    sampled = [chat(client, temperature=0.9, top_p=0.95, seed=7, extra_body={"top_k": 50}) for _ in range(2)]
    assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content

    no_ops = dict(frequency_penalty=0, presence_penalty=0, logprobs=False, logit_bias={}, n=1, user="someone", store=False,
                  metadata={"team": "a"}, response_format={"type": "text"}, tool_choice="none", parallel_tool_calls=True)
    assert chat(client, **no_ops).choices[0].message.content == chat(client).choices[0].message.content


def test_penalties_logit_bias_and_stop_token_ids_equal_with_and_without_speculation(stack, client):
    # the bias makes token 30 win until the penalties of its repetitions outweigh it
    penalties = dict(frequency_penalty=0.8, presence_penalty=0.4, logit_bias={"30": 15},
                     extra_body={"repetition_penalty": 1.2, "min_p": 0.05})
    baseline = chat(client, k=0, **penalties).choices[0].message.content
    assert baseline != chat(client, k=0).choices[0].message.content
    assert chat(client, k=4, **penalties).choices[0].message.content == baseline
    assert "".join(c.choices[0].delta.content or "" for c in chat(client, k=4, stream=True, **penalties) if c.choices) == baseline
    sampled = [chat(client, k=4, temperature=0.9, seed=3, **penalties).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]
    with stack.channel("orchestrator") as channel:
        ids = orchestrator_pb2_grpc.OrchestratorStub(channel).Generate(
            orchestrator_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=20), timeout=60).token_ids[:]
    stopped = complete(client, max_tokens=20, extra_body={"stop_token_ids": [ids[3]]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == ids.index(ids[3])
    assert complete(client, max_tokens=20, extra_body={"ignore_eos": True}).usage.completion_tokens == 20


@pytest.fixture(scope="module")
def eos_stack(tiny_target):
    """A stack whose target ends outputs with <|im_end|>, as structured output needs."""
    target = with_eos(tiny_target, (2,))
    running = start_stack(target, ModelDrafter(target), http_port=free_port())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def eos_client(eos_stack):
    with openai.OpenAI(base_url=base_url(eos_stack), api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def test_several_choices_unary_and_streamed(client):
    sampled = chat(client, k=4, n=3, temperature=0.9, seed=1, max_tokens=12)
    assert [c.index for c in sampled.choices] == [0, 1, 2] and len({c.message.content for c in sampled.choices}) == 3
    assert sampled.usage.completion_tokens == 36
    assert chat(client, k=4, n=1, temperature=0.9, seed=2, max_tokens=12).choices[0].message.content == sampled.choices[1].message.content
    chunks = list(complete(client, k=4, n=2, temperature=0.9, seed=1, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    streamed: dict[int, str] = {}
    for choice in (choice for c in chunks for choice in c.choices):
        streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    unary = complete(client, k=4, n=2, temperature=0.9, seed=1, max_tokens=12)
    assert streamed == {c.index: c.text for c in unary.choices} and chunks[-1].usage.completion_tokens == 24
    greedy = complete(client, k=2, n=2, max_tokens=12).choices
    assert greedy[0].text == greedy[1].text


def test_structured_output_in_chat_and_completions_equal_with_and_without_speculation(client, eos_client):
    with pytest.raises(openai.BadRequestError) as error:  # the module's target has no end-of-sequence token
        chat(client, response_format={"type": "json_object"})
    assert error.value.param == "response_format"
    client = eos_client
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "rank"], "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    baseline = chat(client, k=0, max_tokens=60, response_format=response_format).choices[0]
    assert baseline.finish_reason == "stop" and set(json.loads(baseline.message.content)) == {"city", "rank"}
    assert chat(client, k=4, max_tokens=60, response_format=response_format).choices[0].message.content == baseline.message.content
    streamed = chat(client, k=4, max_tokens=60, response_format=response_format, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == baseline.message.content
    regex = complete(client, k=4, max_tokens=30, extra_body={"structured_outputs": {"regex": "[0-9]{2}-[a-z]{3}"}}).choices[0].text
    assert re.fullmatch("[0-9]{2}-[a-z]{3}", regex)
    choice = complete(client, k=4, max_tokens=30, extra_body={"structured_outputs": {"choice": ["yes (sure)", "no"]}}).choices[0].text
    assert choice in ("yes (sure)", "no")
    text = chat(client, k=4, max_tokens=40, extra_body={"structured_outputs": {"grammar": 'root ::= "<" [a-c]{1,3} ">"'}}).choices[0]
    assert re.fullmatch("<[a-c]{1,3}>", text.message.content)
    assert chat(client, max_tokens=8, response_format={"type": "text"}).choices[0].message.content


def test_logprobs_in_chat_and_completions_unary_and_streamed(stack, client, tokenizer):
    """OpenAI's shapes, equal with and without speculation and between unary and streamed; the
    values are the gRPC API's (test_logprobs.py proves those exact)."""
    baseline = chat(client, k=0, logprobs=True, top_logprobs=3).choices[0]
    speculative = chat(client, k=4, logprobs=True, top_logprobs=3).choices[0]
    content = speculative.logprobs.content
    assert len(content) == 20 and "".join(t.token for t in content) == speculative.message.content
    for entry, base in zip(content, baseline.logprobs.content):
        assert entry.token == base.token and abs(entry.logprob - base.logprob) < 1e-4 and entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and entry.top_logprobs[0].token == entry.token  # greedy: the argmax
    assert chat(client, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []
    assert chat(client).choices[0].logprobs is None
    chunks = list(chat(client, k=4, stream=True, logprobs=True, top_logprobs=3))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in streamed] == [
        (t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in content]

    completion = complete(client, k=4, logprobs=2).choices[0]
    logprobs = completion.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 20
    assert "".join(logprobs.tokens) == completion.text and logprobs.text_offset[0] == 0
    assert all(len(top) <= 2 and max(top.values()) == top[token] for top, token in zip(logprobs.top_logprobs, logprobs.tokens))
    target_only = complete(client, k=0, logprobs=2).choices[0].logprobs
    assert all(abs(a - b) < 1e-4 for a, b in zip(logprobs.token_logprobs, target_only.token_logprobs))
    chunks = list(complete(client, k=4, stream=True, logprobs=2))
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == logprobs.token_logprobs
    assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == logprobs.text_offset
    warped = chat(client, k=4, temperature=0.8, seed=1, logprobs=True, extra_body={"warped_logprobs": True, "top_k": 5}).choices[0]
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 0 for t in warped.logprobs.content)


BAD = {
    "temperature negative": (chat, dict(temperature=-1), "temperature", "invalid_argument"),
    "max_tokens 0": (chat, dict(max_tokens=0), "max_tokens", "invalid_argument"),
    "max_completion_tokens 0": (chat, dict(max_completion_tokens=0), "max_completion_tokens", "invalid_argument"),
    "completion max_tokens over the context": (complete, dict(max_tokens=600), "max_tokens", "invalid_argument"),
    "n 9": (chat, dict(n=9), "n", "invalid_value"),
    "top_p 0": (complete, dict(top_p=0), "top_p", "invalid_argument"),
    "top_k negative": (complete, dict(extra_body={"top_k": -5}), "top_k", "invalid_argument"),
    "K over the limit": (chat, dict(extra_body={"num_speculative_tokens": 99}), "num_speculative_tokens", "invalid_argument"),
    "empty stop": (chat, dict(stop=[""]), "stop", "invalid_argument"),
    "seed negative": (chat, dict(seed=-1), "seed", "invalid_value"),
    "frequency_penalty over 2": (chat, dict(frequency_penalty=2.5), "frequency_penalty", "invalid_argument"),
    "min_p over 1": (complete, dict(extra_body={"min_p": 1.5}), "min_p", "invalid_argument"),
    "logit_bias key": (chat, dict(logit_bias={"dog": 5}), "logit_bias", "invalid_value"),
    "logit_bias over 100": (chat, dict(logit_bias={"5": 500}), "logit_bias", "invalid_argument"),
    "stop_token_ids not ids": (chat, dict(extra_body={"stop_token_ids": ["x"]}), "stop_token_ids", "invalid_value"),
    "top_logprobs over 20": (chat, dict(logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value"),
    "top_logprobs negative": (chat, dict(logprobs=True, top_logprobs=-1), "top_logprobs", "invalid_value"),
    "top_logprobs without logprobs": (chat, dict(top_logprobs=2), "top_logprobs", "invalid_value"),
    "completion logprobs over 20": (complete, dict(logprobs=21), "logprobs", "invalid_value"),
    "echo": (complete, dict(echo=True), "echo", "unsupported_parameter"),
    "response_format type": (chat, dict(response_format={"type": "yaml"}), "response_format", "invalid_value"),
    "response_format schema missing": (chat, dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
                                       "response_format.json_schema", "invalid_value"),
    "response_format bad regex": (complete, dict(extra_body={"structured_outputs": {"regex": "(open"}}), "structured_outputs.regex",
                                  "invalid_argument"),
    "structured_outputs two keys": (chat, dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}}), "structured_outputs",
                                    "invalid_value"),

    "unknown parameter": (chat, dict(extra_body={"temprature": 0.5}), "temprature", "unknown_parameter"),
    "unknown role": (chat, dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role", "invalid_argument"),
    "image part": (chat, dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                   "messages[0].content[0]", "unsupported_parameter"),
    "empty prompt": (complete, dict(prompt=""), "prompt", "invalid_argument"),
    "prompt over the context": (complete, dict(prompt=" a" * 600), "prompt", "invalid_argument"),
    "token-id prompt": (complete, dict(prompt=[1, 2, 3]), "prompt", "unsupported_parameter"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_are_400_naming_the_parameter(stack, client, case):
    call, fields, param, code = BAD[case]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as error:
            call(client, stream=stream, **fields)
        assert error.value.status_code == 400
        assert (error.value.param, error.value.code, error.value.type) == (param, code, "invalid_request_error"), error.value.body
        assert error.value.message
    assert wait_for_sessions(stack) == (0, 0)


def test_models_health_metrics_and_unknown_model(stack, client):
    assert [(m.id, m.object) for m in client.models.list()] == [(MODEL, "model")]
    assert client.models.retrieve(MODEL).id == MODEL
    assert get(stack, "/health") == (200, b'{"status":"SERVING"}')
    status, body = get(stack, "/metrics")
    assert status == 200 and b"specdec:request_success_total" in body
    with pytest.raises(openai.NotFoundError) as error:
        chat(client, model="gpt-4o")
    assert (error.value.param, error.value.code) == ("model", "model_not_found")
    status, body = get(stack, "/v1/nothing-here")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_resource_exhausted_is_429_and_a_deadline_504(tiny_target):
    """A target that holds its most sessions refuses the next: 429 with Retry-After, which the
    openai client retries on; a request past --request-timeout-s: 504."""
    from specdec.v1 import common_pb2, target_pb2_grpc

    target = with_eos(tiny_target, ())
    limited = start_stack(target, ModelDrafter(target), model_service_options={"max_sessions": 1}, request_timeout_s=0.3,
                          http_port=free_port())
    try:
        with openai.OpenAI(base_url=base_url(limited), api_key="x", max_retries=0, timeout=60) as client:
            with limited.channel("target") as channel:
                stub = target_pb2_grpc.TargetServiceStub(channel)
                stub.StartSession(common_pb2.StartSessionRequest(session_id="holder", prompt_token_ids=[1, 2, 3]), timeout=10)
                try:
                    for stream in (False, True):
                        with pytest.raises(openai.RateLimitError) as error:
                            complete(client, max_tokens=4, stream=stream)
                        expected = (429, "rate_limit_error", "resource_exhausted")
                        assert (error.value.status_code, error.value.type, error.value.code) == expected
                        assert int(error.value.response.headers["retry-after"]) >= 1
                finally:
                    stub.EndSession(common_pb2.EndSessionRequest(session_id="holder"), timeout=10)
            with pytest.raises(openai.InternalServerError) as error:
                complete(client, k=0, max_tokens=450)
            assert (error.value.status_code, error.value.type, error.value.code) == (504, "timeout_error", "deadline_exceeded")
        assert wait_for_sessions(limited) == (0, 0)
    finally:
        limited.stop()


def cancelled_count() -> float:
    return REGISTRY.get_sample_value("specdec:request_errors_total", {"service": "orchestrator", "code": "CANCELLED"}) or 0.0


def test_a_client_that_disconnects_cancels_its_generation_and_frees_both_sessions(stack, client):
    before = cancelled_count()
    for _ in range(3):
        stream = complete(client, k=2, max_tokens=450, stream=True)
        assert next(iter(stream)).choices[0].text is not None
        stream.close()
    # unary: the client gives up before the answer is ready
    connection = http.client.HTTPConnection("127.0.0.1", stack.orchestrator.http_port, timeout=30)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 450, "temperature": 0, "num_speculative_tokens": 0})
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    time.sleep(0.3)
    connection.sock.close()
    connection.close()
    assert wait_for_sessions(stack) == (0, 0)
    deadline = time.monotonic() + 10
    while cancelled_count() < before + 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled_count() == before + 4, "each of the four generations was cancelled, not run to its end"
    assert stack.orchestrator.servicer.running == 0


def doc_blocks(stack, language: str) -> list[str]:
    """The page's blocks in `language`, with this stack's address and model name in them."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.M | re.S)
    address = base_url(stack).removesuffix("/v1")
    return [block.replace("http://127.0.0.1:8000", address).replace('"embedded"', f'"{MODEL}"') for block in blocks]


def run(command: list[str]) -> str:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SPECDEC_TOKEN": "unused-here", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, f"{command[-1]}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl command")
def test_every_curl_example_in_the_docs_runs(eos_stack):
    outputs = [run(["bash", "-e", "-o", "pipefail", "-c", block]) for block in doc_blocks(eos_stack, "sh")]
    assert len(outputs) >= 5
    assert json.loads(outputs[0])["data"][0]["id"] == MODEL
    assert json.loads(outputs[1])["choices"][0]["message"]["content"]
    events = [line.removeprefix("data: ") for line in outputs[2].splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] > 0
    assert json.loads(outputs[3])["object"] == "text_completion"


def test_the_python_example_in_the_docs_runs(stack):
    (example,) = doc_blocks(stack, "python")
    assert "1.0" in run([sys.executable, "-c", example]).split()[-1]  # the acceptance rate it prints: every draft accepted


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_bearer_tokens_and_tls_as_on_the_grpc_port(tiny_target, tmp_path):
    from tests.helpers import make_certificates

    certificates = make_certificates(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("# applications\nfirst-secret\nsecond-secret\n")
    secured = start_stack(with_eos(tiny_target, ()), auth_token_file=str(tokens), http_port=free_port(),
                          tls_cert_file=certificates.server_cert, tls_key_file=certificates.server_key)
    context = ssl.create_default_context(cafile=certificates.ca)
    try:
        def secured_client(token: str):
            http_client = openai.DefaultHttpx2Client(verify=context)
            return openai.OpenAI(base_url=base_url(secured, "https"), api_key=token, max_retries=0, timeout=60,
                                 http_client=http_client)

        with secured_client("wrong") as client, pytest.raises(openai.AuthenticationError) as error:
            complete(client, max_tokens=4)
        assert error.value.status_code == 401 and error.value.code == "invalid_api_key"
        for headers in ({}, {"Authorization": "first-secret"}):  # no token; a token without the Bearer scheme
            connection = http.client.HTTPSConnection("127.0.0.1", secured.orchestrator.http_port, context=context, timeout=30)
            connection.request("GET", "/v1/models", headers=headers)
            response = connection.getresponse()
            assert response.status == 401 and response.getheader("www-authenticate") == "Bearer"
            assert json.loads(response.read())["error"]["code"] == "invalid_api_key"
            connection.close()
        with secured_client("second-secret") as client:
            assert complete(client, max_tokens=4).usage.completion_tokens == 4
            assert [m.id for m in client.models.list()] == [MODEL]
        connection = http.client.HTTPSConnection("127.0.0.1", secured.orchestrator.http_port, context=context, timeout=30)
        connection.request("GET", "/health")  # open without a token, for probes
        assert connection.getresponse().status == 200
        connection.close()
        plaintext = http.client.HTTPConnection("127.0.0.1", secured.orchestrator.http_port, timeout=10)
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            plaintext.request("GET", "/health")
            plaintext.getresponse()
        plaintext.close()
    finally:
        secured.stop()


def test_503_before_the_model_services_are_ready():
    """The HTTP port listens from start-up: /health and generations answer 503 while the
    orchestrator is still waiting for its target."""
    port = free_port()
    config = orchestrator_server.OrchestratorConfig(port=0, target=f"127.0.0.1:{free_port()}", draft="", http_port=port,
                                                    connect_timeout_s=60)
    loop = LoopThread()

    async def begin():
        return asyncio.ensure_future(orchestrator_server.start(config, tokenizer=object()))

    async def cancel():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # start() stops what it started, the HTTP port included

    task = loop.run(begin())
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/health")
                response = connection.getresponse()
                break
            except ConnectionError:
                assert time.monotonic() < deadline, "the HTTP port did not open"
                time.sleep(0.1)
        assert response.status == 503 and json.loads(response.read()) == {"status": "NOT_SERVING"}
        connection.close()
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30) as client:
            for call in (lambda: complete(client), lambda: list(chat(client, stream=True)), lambda: client.models.list()):
                with pytest.raises(openai.InternalServerError) as error:
                    call()
                assert error.value.status_code == 503 and error.value.code == "unavailable"
                assert error.value.type == "service_unavailable_error"
    finally:
        loop.run(cancel())
        loop.close()


def test_drain_refuses_new_generations_and_lets_running_ones_finish(tiny_target):
    target = with_eos(tiny_target, ())
    running = start_stack(target, ModelDrafter(target), http_port=free_port())
    url = base_url(running)
    stopped = None
    try:
        with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60) as client:
            stream = iter(complete(client, k=0, max_tokens=300, stream=True))
            next(stream)
            stopped = threading.Thread(target=lambda: running.loop.run(running.orchestrator.stop(grace_s=60)))
            stopped.start()
            deadline = time.monotonic() + 10
            while get(running, "/health")[0] != 503:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with pytest.raises(openai.InternalServerError) as error:
                complete(client, max_tokens=4)
            assert error.value.status_code == 503
            rest = list(stream)
            assert rest[-1].choices[0].finish_reason == "length"
            assert rest[-1].model_extra["specdec_stats"]["generated_tokens"] == 300
        stopped.join(30)
        assert not stopped.is_alive()
        assert wait_for_sessions(running) == (0, 0)
        with pytest.raises(ConnectionError):
            get(running, "/health")
    finally:
        if stopped is None:
            running.stop()
        else:
            stopped.join(30)
            for service in (running.draft, running.target):
                running.loop.run(service.stop())
            running.loop.close()
