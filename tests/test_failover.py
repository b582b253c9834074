"""Replicas and session rebuilds, in process: a target or draft replica that dies mid-request is
replaced by another (or by itself once back), from the prompt and the committed tokens, and the
output is the one an undisturbed run gives, greedy and seeded sampling alike; when every target
replica is gone, the request ends with UNAVAILABLE carrying the output so far."""

from __future__ import annotations

import asyncio
import time

import pytest

from draft_service.drafters.model import ModelDrafter
from draft_service.engine import DraftEngine
from harness.inprocess import run_generation
from harness.loop import LoopThread
from harness.tiny import tiny_lm, with_eos
from orchestrator import server as orchestrator_server
from orchestrator.backends import InProcessDraft, InProcessTarget
from orchestrator.generation import GenerationEngine, GenerationRequest
from orchestrator.replicas import DraftReplicas, Replica, TargetReplicas, resolve
from specdec import lm
from specdec.errors import OutputIncomplete, Upstream
from target_service import server as target_server
from target_service.engine import TargetEngine
from tests.helpers import joined

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown"


class Killable:
    """A backend that dies like a killed process after `calls_left` calls: every call then fails
    UNAVAILABLE, or, with `restarted` (a new engine), only the first, after which it serves again
    without the sessions it held, as a restarted process."""

    def __init__(self, backend, calls_left: int = 10**9, restarted=None):
        self.backend, self.calls_left, self.restarted = backend, calls_left, restarted

    def __getattr__(self, name):
        async def call(*args, **kwargs):
            self.calls_left -= 1
            if self.calls_left < 0:
                if self.restarted is not None:
                    self.backend.engine, self.calls_left, self.restarted = self.restarted(), 10**9, None
                raise Upstream("UNAVAILABLE", "the replica was killed")
            return await getattr(self.backend, name)(*args, **kwargs)

        return call


def generation(target, drafter_of, target_calls=(10**9, 10**9), draft_calls=(10**9, 10**9)):
    """An engine over two target replicas and two draft replicas (`drafter_of()` each) that die
    after the given numbers of calls."""
    targets = TargetReplicas("target", [Replica(f"t{i}", Killable(InProcessTarget(TargetEngine(target)), n)) for i, n in enumerate(target_calls)])
    drafts = DraftReplicas("draft", [Replica(f"d{i}", Killable(InProcessDraft(DraftEngine(drafter_of(), max_context=target.max_context)), n))
                                     for i, n in enumerate(draft_calls)])
    info = targets.replicas[0].backend.backend.engine.info()
    draft_info = drafts.replicas[0].backend.backend.engine.info()
    return GenerationEngine(target.tokenizer, targets, info, drafts, draft_info), targets, drafts


def held(replicas) -> list[int]:
    return [len(r.backend.backend.engine.sessions) for r in replicas.replicas]


REQUESTS = {
    "greedy": GenerationRequest(prompt=PROMPT, max_new_tokens=32, num_speculative_tokens=3),
    "sampled": GenerationRequest(prompt=PROMPT, max_new_tokens=32, num_speculative_tokens=3, temperature=0.9, top_k=40, seed=5),
}


@pytest.mark.parametrize("kind", list(REQUESTS))
def test_a_target_replica_killed_mid_request_changes_nothing(tiny_target, tiny_draft, kind):
    target = with_eos(tiny_target, ())
    undisturbed, _, _ = generation(target, lambda: ModelDrafter(tiny_draft))
    reference = joined(run_generation(undisturbed, REQUESTS[kind]))
    engine, targets, drafts = generation(target, lambda: ModelDrafter(tiny_draft), target_calls=(5, 10**9))
    events = run_generation(engine, REQUESTS[kind])
    assert joined(events) == reference
    assert events[-1].stats.target_rebuilds == 1 and events[-1].stats.generated_tokens == 32
    assert not targets.replicas[0].healthy and held(targets)[1] == 0 and held(drafts) == [0, 0]  # the killed one holds nothing real


def test_a_draft_replica_killed_mid_request_is_replaced(tiny_target):
    target = with_eos(tiny_target, ())
    reference = joined(run_generation(generation(target, lambda: ModelDrafter(target))[0], REQUESTS["greedy"]))
    engine, _, drafts = generation(target, lambda: ModelDrafter(target), draft_calls=(4, 10**9))
    events = run_generation(engine, REQUESTS["greedy"])
    assert joined(events) == reference
    stats = events[-1].stats
    assert stats.draft_rebuilds == 1 and stats.acceptance_rate == 1.0  # the second draft replica drafted the rest
    assert held(drafts)[1] == 0  # the killed one holds nothing real


def test_a_lone_target_that_restarts_takes_the_session_again(tiny_target):
    target = with_eos(tiny_target, ())
    reference = joined(run_generation(generation(target, lambda: ModelDrafter(target))[0], REQUESTS["sampled"]))
    engine, targets, _ = generation(target, lambda: ModelDrafter(target), target_calls=(4,))
    targets.replicas[0].backend.restarted = lambda: TargetEngine(target)
    events = run_generation(engine, REQUESTS["sampled"])
    assert joined(events) == reference and events[-1].stats.target_rebuilds == 1


def test_when_every_target_replica_is_gone_the_output_so_far_comes_with_unavailable(tiny_target):
    target = with_eos(tiny_target, ())
    engine, _, _ = generation(target, lambda: ModelDrafter(target), target_calls=(6, 2))
    with pytest.raises(OutputIncomplete) as error:
        run_generation(engine, GenerationRequest(prompt=PROMPT, max_new_tokens=64, num_speculative_tokens=2))
    assert error.value.code_name == "UNAVAILABLE" and error.value.token_ids and error.value.text
    assert f"{len(error.value.token_ids)} tokens were generated" in error.value.message


def test_with_every_draft_replica_gone_from_its_name_requests_go_on_target_only(tiny_target):
    target = with_eos(tiny_target, ())
    reference = joined(run_generation(generation(target, lambda: ModelDrafter(target))[0], REQUESTS["greedy"]))
    engine, _, drafts = generation(target, lambda: ModelDrafter(target))
    for replica in drafts.replicas:  # what a dns:/// draft name that resolves to nothing any more leaves
        replica.retired = True
    events = run_generation(engine, REQUESTS["greedy"])
    assert joined(events) == reference and events[-1].stats.draft_tokens == 0


def test_a_session_leaves_the_replica_it_failed_on_even_when_no_replica_looks_healthy(tiny_target):
    target = with_eos(tiny_target, ())
    _, targets, _ = generation(target, lambda: ModelDrafter(target))

    async def rebuild():
        await targets.start_session("s", [1, 2, 3], None)
        first = targets.of("s")
        for replica in targets.replicas:  # the survivor's last health check timed out
            replica.healthy = False
        await targets.start_session("s", [1, 2, 3], None)
        return first, targets.of("s")

    first, second = asyncio.run(rebuild())
    assert second is not first


def test_new_sessions_go_to_the_least_loaded_healthy_replica(tiny_target):
    target = with_eos(tiny_target, ())
    engine, targets, _ = generation(target, lambda: ModelDrafter(target), target_calls=(10**9, 10**9))

    async def place():
        for index in range(4):
            await targets.start_session(f"s{index}", [1, 2, 3], None)
        counts = [r.sessions for r in targets.replicas]
        targets.replicas[0].healthy = False
        await targets.start_session("s4", [1, 2, 3], None)
        return counts, targets.of("s4").address

    counts, address = asyncio.run(place())
    assert counts == [2, 2] and address == "t1"


def test_dns_names_expand_to_every_address():
    async def expand():
        return await resolve("10.0.0.1:50051, dns:///localhost:50052,10.0.0.1:50051")

    endpoints = asyncio.run(expand())
    assert endpoints[0] == "10.0.0.1:50051" and len(endpoints) == len(set(endpoints)) >= 2
    assert all(e.endswith(":50052") for e in endpoints[1:]) and "127.0.0.1:50052" in endpoints


def test_a_target_replica_in_another_weight_format_is_not_used(tokenizer):
    """Two real target servers of the same model, one in float32, one in bfloat16: the orchestrator
    keeps only the one in its reference replica's format, since a session rebuilt on the other
    would not compute the same logits."""
    same, other = (tiny_lm(seed=1, vocab_size=len(tokenizer), tokenizer=tokenizer, name="tiny-target") for _ in range(2))
    lm.use_format(other.model, "bfloat16")
    loop = LoopThread()

    async def start_all():
        servers = [await target_server.start(target_server.TargetConfig(port=0), loaded=model) for model in (same, other)]
        config = orchestrator_server.OrchestratorConfig(
            port=0, target=",".join(f"127.0.0.1:{s.port}" for s in servers), draft="", target_health_period_s=0.2
        )
        return servers, await orchestrator_server.start(config, tokenizer=same.tokenizer)

    servers, orchestrator = loop.run(start_all())
    try:
        targets = orchestrator.replica_sets[0]
        deadline = time.monotonic() + 30
        while len(targets.replicas) == 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # refused on the first health round that finds it serving
        (kept,) = targets.replicas
        formats = {f"127.0.0.1:{s.port}": lm.weight_format(m.model) for s, m in zip(servers, (same, other))}
        assert formats[kept.address] == orchestrator.servicer.engine.target_info.weight_format
    finally:
        async def stop_all():
            await asyncio.gather(orchestrator.stop(), *(s.stop() for s in servers))

        loop.run(stop_all())
        loop.close()
