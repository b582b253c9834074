"""Cross-request batching: the scheduler's policy (fusion, lone requests, one session per batch,
error isolation, admission, jobs between batches), the engines' fused calls against unbatched
ones, and concurrent generations through the real services."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest
import torch

from draft_service.drafters.model import ModelDrafter
from draft_service.engine import DraftEngine
from harness.inprocess import start_stack
from harness.tiny import tiny_lm
from specdec import sampling
from specdec.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from specdec.messages import ProposeWork, VerifyWork
from specdec.model_service.batching import BatchingConfig, BatchScheduler
from specdec.model_service.runtime import ModelWorker
from specdec.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, target_pb2_grpc
from target_service.engine import TargetEngine


class Item:
    def __init__(self, session_id: str, value: int = 0):
        self.session_id, self.value = session_id, value


def recording_scheduler(config: BatchingConfig, fail_on: int | None = None):
    """A scheduler whose engine doubles values, logs each batch, and fails calls holding `fail_on`."""
    log: list[list[list[int]]] = []

    def run_batch(calls):
        log.append([[item.value for item in call] for call in calls])
        time.sleep(0.02)  # a forward pass: calls arriving meanwhile queue up
        return [
            InvalidArgument("bad value", "items[0].value") if any(i.value == fail_on for i in call) else [2 * i.value for i in call]
            for call in calls
        ]

    return BatchScheduler(ModelWorker("test"), run_batch, config), log


def test_concurrent_calls_of_active_sessions_share_one_batch():
    async def scenario():
        scheduler, log = recording_scheduler(BatchingConfig(max_wait_s=0.5))
        for session in "abcd":  # the sessions were active before: the scheduler expects them back
            await scheduler.submit([Item(session)])
        log.clear()
        results = await asyncio.gather(*(scheduler.submit([Item(s, v)]) for v, s in enumerate("abcd", 1)))
        await scheduler.close()
        return results, log

    results, log = asyncio.run(scenario())
    assert [values for values, _ in results] == [[2], [4], [6], [8]]
    assert log == [[[1], [2], [3], [4]]]
    assert all(info.items == 4 and info.calls == 4 for _, info in results)


def test_a_lone_request_does_not_wait_for_company():
    async def scenario():
        scheduler, _ = recording_scheduler(BatchingConfig(max_wait_s=5.0))
        started = time.monotonic()
        await scheduler.submit([Item("a", 1)])
        await scheduler.close()
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 1.0


def test_a_session_appears_once_per_batch_and_full_batches_split():
    async def scenario():
        scheduler, log = recording_scheduler(BatchingConfig(max_batch_items=2, max_wait_s=0.2))
        calls = [[Item("a", 1)], [Item("a", 2)], [Item("b", 3)], [Item("c", 4)]]
        await asyncio.gather(*(scheduler.submit(call) for call in calls))
        await scheduler.close()
        return log

    batches = asyncio.run(scenario())
    assert sorted(v for batch in batches for call in batch for v in call) == [1, 2, 3, 4]
    assert all(sum(len(call) for call in batch) <= 2 for batch in batches)
    assert all(not ({1, 2} <= {v for call in batch for v in call}) for batch in batches)


def test_an_invalid_call_fails_alone():
    async def scenario():
        scheduler, _ = recording_scheduler(BatchingConfig(max_wait_s=0.2), fail_on=2)
        results = await asyncio.gather(
            *(scheduler.submit([Item(s, v)]) for v, s in enumerate("abc", 1)), return_exceptions=True
        )
        await scheduler.close()
        return results

    first, second, third = asyncio.run(scenario())
    assert first[0] == [2] and third[0] == [6]
    assert isinstance(second, InvalidArgument)


def test_a_full_queue_is_resource_exhausted_with_a_retry_hint():
    async def scenario():
        scheduler, _ = recording_scheduler(BatchingConfig(max_queued_items=2, max_batch_items=1))
        results = await asyncio.gather(*(scheduler.submit([Item(s)]) for s in "abcde"), return_exceptions=True)
        await scheduler.close()
        return results

    results = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert refused and all(r.retry_after_s > 0 for r in refused)
    assert len(refused) < len(results)


def test_jobs_run_between_batches():
    """A prefill cut into three chunk jobs lets the rounds of another session run in between."""
    order = []

    async def scenario():
        def run_batch(calls):
            order.append("verify")
            time.sleep(0.01)
            return [[0] for _ in calls]

        scheduler = BatchScheduler(ModelWorker("test"), run_batch, BatchingConfig(max_wait_s=0))

        def chunk():
            order.append("prefill")
            time.sleep(0.01)

        async def rounds():
            for _ in range(3):
                await scheduler.submit([Item("other")])

        async def prefill():
            for _ in range(3):
                await scheduler.job(chunk)

        await asyncio.gather(rounds(), prefill())
        await scheduler.close()

    asyncio.run(scenario())
    assert order.count("verify") == 3 and order.count("prefill") == 3
    assert "verify" in order[order.index("prefill") : len(order) - order[::-1].index("prefill")]


@pytest.fixture(scope="module")
def small():
    return tiny_lm(seed=7, vocab_size=96, max_context=512)


def ragged_prompts(count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 96, (10 + 13 * i,), generator=generator).tolist() for i in range(count)]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_fused_verify_equals_verifying_each_call_alone(small, temperature):
    """Greedy: identical tokens. Sampling: identical verdicts for the same uniforms (the batch
    changes nothing about p)."""
    params = sampling.SamplingParams(temperature=temperature)
    prompts = ragged_prompts(4)
    engines = {"alone": TargetEngine(small), "fused": TargetEngine(small)}
    for engine in engines.values():
        for index, prompt in enumerate(prompts):
            engine.start_session(f"s{index}", prompt)
    generator = torch.Generator().manual_seed(4)
    lengths = [len(p) - 1 for p in prompts]
    pending = [[p[-1]] for p in prompts]
    for _ in range(4):
        calls = []
        for index in range(len(prompts)):
            k = index + 1  # ragged K too
            drafts = torch.randint(0, 96, (k,), generator=generator).tolist()
            uniforms = torch.rand(k + 1, generator=generator).tolist() if temperature else []
            calls.append([VerifyWork(f"s{index}", lengths[index], pending[index], drafts, None, params, uniforms)])
        alone = [engines["alone"].verify(call) for call in calls]
        fused = engines["fused"].verify_calls(calls)
        assert fused == alone
        for index, (verdict,) in enumerate(alone):
            lengths[index] += 1 + verdict.accepted
            pending[index] = [verdict.next_token]


def test_fused_verify_isolates_an_invalid_call(small):
    engine = TargetEngine(small)
    engine.start_session("a", [1, 2, 3])
    engine.start_session("b", [4, 5, 6])
    good = [VerifyWork("a", 2, [3], [7], None, sampling.GREEDY, [])]
    unknown = [VerifyWork("nope", 2, [3], [7], None, sampling.GREEDY, [])]
    twice = [VerifyWork("a", 2, [3], [7], None, sampling.GREEDY, [])]
    outcome = engine.verify_calls([good, unknown, twice, [VerifyWork("b", 2, [6], [], None, sampling.GREEDY, [])]])
    assert len(outcome[0]) == 1 and len(outcome[3]) == 1
    assert isinstance(outcome[1], NotFound) and outcome[1].field == "items[0].session_id"
    assert isinstance(outcome[2], FailedPrecondition)


def test_fused_propose_equals_proposing_each_call_alone(small):
    prompts = ragged_prompts(3)
    engines = {"alone": DraftEngine(ModelDrafter(small), max_context=512), "fused": DraftEngine(ModelDrafter(small), max_context=512)}
    for engine in engines.values():
        for index, prompt in enumerate(prompts):
            engine.start_session(f"s{index}", prompt)
    calls = [[ProposeWork(f"s{i}", len(p) - 1, [p[-1]], 2 + i, sampling.GREEDY, [])] for i, p in enumerate(prompts)]
    alone = [engines["alone"].propose(call)[0] for call in calls]
    fused = engines["fused"].propose_calls(calls)
    assert [proposals for proposals, _ in fused] == alone
    assert fused[0][1] == 4  # passes shared: as many as the longest K


def test_chunked_prefill_gives_the_same_cache(small):
    prompt = ragged_prompts(4)[-1]
    whole, chunked = TargetEngine(small), TargetEngine(small)
    whole.start_session("s", prompt)
    chunks = chunked.begin_session("s", prompt, prefill_chunk_tokens=7)
    steps = 0
    while chunks:
        chunks = chunked.prefill("s")
        steps += 1
    assert steps == -(-(len(prompt) - 1) // 7)
    work = [VerifyWork("s", len(prompt) - 1, [prompt[-1]], [1, 2], None, sampling.GREEDY, [])]
    assert whole.verify(work) == chunked.verify(work)


def test_verify_before_the_prefill_finished_is_failed_precondition(small):
    engine = TargetEngine(small)
    engine.begin_session("s", list(range(20)), prefill_chunk_tokens=5)
    engine.prefill("s")
    with pytest.raises(FailedPrecondition, match="prefilling"):
        engine.verify([VerifyWork("s", 19, [19], [], None, sampling.GREEDY, [])])


def test_concurrent_generations_through_the_services_are_batched_and_exact(tiny_target, tiny_draft):
    """Eight concurrent greedy requests: each output equals the same request run alone, and the
    target fused calls of different requests into shared forward passes."""
    stack = start_stack(tiny_target, ModelDrafter(tiny_draft))
    try:
        stub = orchestrator_pb2_grpc.OrchestratorStub(stack.channel("orchestrator"))
        requests = [
            orchestrator_pb2.GenerateRequest(prompt=f"Request number {i} asks:", max_new_tokens=24, num_speculative_tokens=2)
            for i in range(8)
        ]
        alone = [stub.Generate(r, timeout=120).token_ids for r in requests]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda r: stub.Generate(r, timeout=120).token_ids, requests))
        assert together == alone
        stats = stack.target.servicer.scheduler.stats
        assert stats.largest > 1, stats
        target = target_pb2_grpc.TargetServiceStub(stack.channel("target"))
        assert target.GetModelInfo(common_pb2.GetModelInfoRequest()).active_sessions == 0
    finally:
        stack.stop()


def test_urgent_jobs_overtake_queued_jobs():
    """Ending a session must not wait behind other sessions' queued prefill chunks."""
    order = []

    async def scenario():
        scheduler = BatchScheduler(ModelWorker("test"), lambda calls: [], BatchingConfig())

        def chunk(name):
            order.append(name)
            time.sleep(0.02)

        slow = [asyncio.ensure_future(scheduler.job(chunk, f"prefill {i}")) for i in range(3)]
        await asyncio.sleep(0)  # the first chunk is running
        await scheduler.job(chunk, "end session", urgent=True)
        await asyncio.gather(*slow)
        await scheduler.close()

    asyncio.run(scenario())
    assert order.index("end session") < order.index("prefill 2")


def test_a_lone_call_runs_on_the_event_loop_and_company_or_long_batches_go_to_the_worker():
    """At concurrency 1 the hand-off to the worker thread and back is spared; with other sessions
    about, after a batch longer than INLINE_MAX_S, or while the worker is busy, it is not."""
    from specdec.model_service import batching

    threads: list[str] = []
    pause = {"s": 0.0}

    def run_batch(calls):
        threads.append("loop" if threading.current_thread() is threading.main_thread() else "worker")
        time.sleep(pause["s"])
        return [[item.value for item in call] for call in calls]

    async def scenario():
        worker = ModelWorker("test")
        scheduler = BatchScheduler(worker, run_batch, BatchingConfig(max_wait_s=0.05, active_window_s=0.5))
        for value in range(3):  # the first batch has no measured length yet: the worker
            await scheduler.submit([Item("a", value)])
        # b is new: a cannot know it is coming and runs alone; b, with a active, goes to the worker
        await asyncio.gather(scheduler.submit([Item("a")]), scheduler.submit([Item("b")]))
        await asyncio.gather(scheduler.submit([Item("a")]), scheduler.submit([Item("b")]))  # company: one batch
        await asyncio.sleep(0.6)  # b is no longer expected
        await scheduler.submit([Item("a")])
        pause["s"] = batching.INLINE_MAX_S + 0.02
        await scheduler.submit([Item("a")])  # this one is long ...
        await scheduler.submit([Item("a")])  # ... so the next goes to the worker
        pause["s"] = 0.0
        await scheduler.submit([Item("a")])  # after a long batch: the worker (this one is short)
        busy = asyncio.ensure_future(worker.run(time.sleep, 0.05))  # short batches, but the worker is busy
        await asyncio.sleep(0.01)
        await scheduler.submit([Item("a")])
        await busy
        await scheduler.close()
        worker.shutdown()

    asyncio.run(scenario())
    assert threads == ["worker", "loop", "loop", "loop", "worker", "worker", "loop", "loop", "worker", "worker", "worker"]


def test_a_lone_call_on_an_idle_scheduler_is_answered_without_a_turn_of_the_event_loop():
    """No hand-off to the serving task and back: nothing else runs between the call and its answer."""

    async def scenario():
        scheduler = BatchScheduler(ModelWorker("test"), lambda calls: [[item.value for item in call] for call in calls], BatchingConfig())
        await scheduler.submit([Item("a", 0)])  # the first batch has no measured length: the worker
        for value in range(1, 4):
            turned = []
            asyncio.get_running_loop().call_soon(turned.append, value)  # runs at the loop's next turn
            results, info = await scheduler.submit([Item("a", value)])
            assert results == [value] and info.items == 1 and not turned
            await asyncio.sleep(0)
        await scheduler.close()

    asyncio.run(scenario())
