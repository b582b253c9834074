"""End to end with the embedded SmolLM2-135M-Instruct target, each service its own process started
from its command line, as a user runs them. Slow (model load, CPU decoding), run in CI."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from harness.processes import ServiceStack
from specdec.models import convert_gguf, embedded_gguf_path
from specdec.v1 import orchestrator_pb2

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the square of a number.",
    "List three colors of the rainbow.",
]


def generate(stub, question: str, k: int, max_new_tokens: int = 40) -> orchestrator_pb2.GenerateResponse:
    request = orchestrator_pb2.GenerateRequest(max_new_tokens=max_new_tokens, num_speculative_tokens=k)
    request.messages.add(role="user", content=question)
    return stub.Generate(request, timeout=600)


@pytest.mark.parametrize("draft", ["ngram", "embedded"])
def test_embedded_pair_greedy_output_equals_target_only(draft, tmp_path):
    # no draft timeout: on a busy 2-core machine the embedded model drafting for itself can take
    # longer than the default, and this test is about exactness and acceptance, not fallbacks
    with ServiceStack(draft_model=draft, log_dir=tmp_path, extra_orchestrator_args=("--draft-timeout-ms", "0")) as stack:
        stub = stack.orchestrator_stub()
        for question in QUESTIONS:
            baseline = generate(stub, question, k=0)
            speculative = generate(stub, question, k=4)
            assert list(speculative.token_ids) == list(baseline.token_ids), question
            assert speculative.text == baseline.text
            if draft == "embedded":  # the target drafting for itself: (nearly) everything accepted
                assert speculative.stats.acceptance_rate > 0.9
        processes = list(stack.processes.values())
    # SIGTERM: each service drained and exited cleanly.
    assert [p.returncode for p in processes] == [0, 0, 0]


def test_replicas_converting_the_embedded_model_at_once_share_one_cache(tmp_path, monkeypatch):
    """Two writers dequantize the embedded GGUF into one empty cache at the same time, as replicas
    sharing a cache volume do at their first start: both get the same complete folder and nothing
    half-written stays. (Both threads of one process: a partial name made of the process id, the
    same for both here and for every container's process 1, collides.)"""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: convert_gguf(embedded_gguf_path()), range(2)))
    assert folders[0] == folders[1] and (folders[0] / "config.json").exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [folders[0].name]
