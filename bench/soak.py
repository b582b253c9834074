"""`python -m bench.soak`: the three services under a steady mix of normal, cancelled and invalid
requests for a long time, to show that nothing leaks or wedges: not a unit test, a command.

    python -m bench.soak --minutes 20 --concurrency 8     # embedded target, smollm2-draft-l6
    python -m bench.soak --minutes 1 --quick              # tiny random model: checks the tool works
    python -m bench.soak --minutes 30 --replicas 2 --kill-every-s 60,180 --out bench/results/chaos   # make chaos

Chaos (`--kill-every-s MIN,MAX` with `--replicas 2`): two replicas of each model service, and one
of the four killed (kill -9) at a random moment every MIN to MAX seconds and started again; every
normal request must still end OK (sessions are rebuilt on the other replica) and every greedy
output must equal its reference (the prompt's target-only output, computed before the first kill).

The services run as subprocesses (bench/stack.py). `--concurrency` clients loop until the time is
up, each request drawn at random: a normal generation (unary or streamed, greedy or sampled, K in
0..6), a stream the client cancels after a few messages, or an invalid request (which must be
INVALID_ARGUMENT). Reported, to stdout and --out/soak.json: requests by kind and outcome, errors
by status code, sessions still held by the model services at the end (must be 0), and the
resident memory (RSS) of every process lifetime (a restarted service is a new lifetime), sampled
every 15 s: its warm value (the sample a minute after the lifetime began: a fresh process first
grows its allocator arenas and KV buffers), its peak and its last; a lifetime of 5 minutes or more
whose last sample is more than 10 % above its warm one marks the run as leaking.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import threading
import time
from pathlib import Path

import grpc
import psutil

from harness.processes import ServiceStack
from specdec.v1 import common_pb2, draft_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc, target_pb2_grpc

RESULTS = Path(__file__).resolve().parent / "results" / "soak"
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain why the sky is blue in two sentences.",
    "List three prime numbers and add them up.",
    "def fibonacci(n):",
]
INVALID = [
    dict(prompt="", max_new_tokens=8),
    dict(prompt="hi", max_new_tokens=0),
    dict(prompt="hi", max_new_tokens=8, temperature=float("nan")),
    dict(prompt="hi", max_new_tokens=8, top_p=1.5),
    dict(prompt="hi", max_new_tokens=8, num_speculative_tokens=1000),
    dict(prompt="hi", max_new_tokens=8, stop=[""]),
    dict(prompt="x " * 100_000, max_new_tokens=8),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--target", default="embedded", help="target model")
    parser.add_argument("--draft", default="smollm2-draft-l6", help="draft model, or 'ngram'")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="largest max_new_tokens of a normal request")
    parser.add_argument("--mix", default="0.6,0.2,0.2", help="shares of normal, cancelled and invalid requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="tiny random model for target and draft (outputs are gibberish)")
    parser.add_argument("--replicas", type=int, default=1, help="processes of each model service, all given to the orchestrator")
    parser.add_argument("--dtype", default="", help="weight format of the target replicas (they must share one); empty: the service's default")
    parser.add_argument("--kill-every-s", default="", help="MIN,MAX: kill -9 a random model service this often, then restart it")
    return parser.parse_args(argv)


def normal_request(rng: random.Random, max_new_tokens: int) -> orchestrator_pb2.GenerateRequest:
    request = orchestrator_pb2.GenerateRequest(
        prompt=rng.choice(PROMPTS), max_new_tokens=rng.randint(1, max_new_tokens), num_speculative_tokens=rng.randint(0, 6)
    )
    if rng.random() < 0.5:
        request.temperature, request.top_p, request.seed = 0.8, 0.95, rng.getrandbits(32)
    return request


async def one_request(stub, rng: random.Random, kind: str, max_new_tokens: int, references: dict[str, list[int]]) -> str:
    """Run one request of `kind`; its outcome: OK, CANCELLED, MISMATCH (a greedy output that is
    not its reference's beginning), or a status code name."""
    try:
        if kind == "invalid":
            await stub.Generate(orchestrator_pb2.GenerateRequest(**rng.choice(INVALID)), timeout=60)
            return "OK"
        request = normal_request(rng, max_new_tokens)
        if kind == "cancelled":
            call = stub.GenerateStream(request, timeout=600)
            for _ in range(rng.randint(1, 3)):
                if await call.read() == grpc.aio.EOF:
                    return "OK"  # finished before we could cancel it
            call.cancel()
            return "CANCELLED"
        if rng.random() < 0.5:
            tokens = list((await stub.Generate(request, timeout=600)).token_ids)
        else:
            tokens = [t async for message in stub.GenerateStream(request, timeout=600) for t in message.token_ids]
        reference = references.get(request.prompt)
        if request.temperature == 0 and reference is not None and tokens != reference[: len(tokens)]:
            return "MISMATCH"
        return "OK"
    except grpc.aio.AioRpcError as error:
        return error.code().name


async def client(address: str, deadline: float, rng: random.Random, args, outcomes: collections.Counter, references) -> None:
    kinds, weights = ["normal", "cancelled", "invalid"], [float(w) for w in args.mix.split(",")]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            outcomes[(kind, await one_request(stub, rng, kind, args.max_new_tokens, references))] += 1


def greedy_references(stack: ServiceStack, max_new_tokens: int) -> dict[str, list[int]]:
    """Each prompt's target-only greedy output at the longest length a request may ask for."""
    with grpc.insecure_channel(stack.address("orchestrator")) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        return {prompt: list(stub.Generate(orchestrator_pb2.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens,
                                                                            num_speculative_tokens=0), timeout=600).token_ids)
                for prompt in PROMPTS}


def chaos(stack: ServiceStack, every_s: tuple[float, float], rng: random.Random, stop: threading.Event, kills: list) -> None:
    """Until `stop`: wait a random time in `every_s`, kill -9 a random model service, start it again
    (and wait until it serves), record (name, seconds since the start, seconds down)."""
    started = time.monotonic()
    while not stop.wait(rng.uniform(*every_s)):
        victim = rng.choice(stack.targets + stack.drafts)
        killed = time.monotonic()
        stack.processes[victim].kill()
        stack.processes[victim].wait(30)
        stack.restart(victim)
        kills.append({"service": victim, "at_s": round(killed - started, 1), "down_s": round(time.monotonic() - killed, 1)})


MEMORY_EVERY_S, WARM_AFTER_S, FLAT_AFTER_S, FLAT_WITHIN = 15.0, 60.0, 300.0, 0.10


def sample_memory(stack: ServiceStack, stop: threading.Event, samples: dict) -> None:
    """Until `stop`: every MEMORY_EVERY_S, append (seconds, RSS in MiB) to samples[(name, pid)]."""
    while True:
        for name, process in list(stack.processes.items()):
            with contextlib.suppress(psutil.Error):  # killed between listing and reading
                rss = psutil.Process(process.pid).memory_info().rss / 2**20
                if rss:  # 0: killed, not yet reaped
                    samples.setdefault((name, process.pid), []).append((time.monotonic(), rss))
        if stop.wait(MEMORY_EVERY_S):
            return


def memory_lifetimes(samples: dict) -> list[dict]:
    """One row per process lifetime: warm, peak and last RSS, and whether it stayed flat."""
    rows = []
    for (name, pid), series in samples.items():
        began = series[0][0]
        warm = next((rss for t, rss in series if t - began >= WARM_AFTER_S), series[0][1])
        minutes, last = (series[-1][0] - began) / 60, series[-1][1]
        rows.append({"service": name, "pid": pid, "minutes": round(minutes, 1), "warm_mb": round(warm, 1),
                     "peak_mb": round(max(rss for _, rss in series), 1), "last_mb": round(last, 1),
                     "growth": round(last / warm - 1, 3),
                     "flat": minutes * 60 < FLAT_AFTER_S or last <= warm * (1 + FLAT_WITHIN)})
    return rows


def sessions_held(stack: ServiceStack, settle_s: float = 15.0) -> dict[str, int]:
    """Sessions each model service process still holds once in-flight cleanup had `settle_s` to finish."""
    stubs = {**{n: target_pb2_grpc.TargetServiceStub for n in stack.targets}, **{n: draft_pb2_grpc.DraftServiceStub for n in stack.drafts}}
    deadline = time.monotonic() + settle_s
    while True:
        held = {}
        for name, stub_class in stubs.items():
            with grpc.insecure_channel(stack.address(name)) as channel:
                held[name] = stub_class(channel).GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30).active_sessions
        if not any(held.values()) or time.monotonic() > deadline:
            return held
        time.sleep(0.5)


def report(args, outcomes: collections.Counter, memory: list[dict], held: dict, seconds: float, kills: list) -> dict:
    by_kind: dict[str, dict[str, int]] = collections.defaultdict(dict)
    errors: collections.Counter = collections.Counter()
    for (kind, outcome), count in sorted(outcomes.items()):
        by_kind[kind][outcome] = count
        if outcome not in ("OK", "CANCELLED"):
            errors[outcome] += count
    unexpected = {k: n for (kind, k), n in outcomes.items() if (kind, k) not in EXPECTED}
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": round(seconds, 1),
        "requests": sum(outcomes.values()),
        "completed": sum(n for (kind, k), n in outcomes.items() if kind == "normal" and k == "OK"),
        "by_kind": by_kind,
        "errors_by_status": dict(errors),
        "unexpected_outcomes": unexpected,
        "sessions_held_at_end": held,
        "memory_flat": all(row["flat"] for row in memory),
        "resident_memory_mb": memory,
        "kills": len(kills),
        "kill_log": kills,
    }


# A normal request ends OK, a cancelled one CANCELLED (or OK when it finished first), an invalid
# one INVALID_ARGUMENT; anything else is a finding.
EXPECTED = {("normal", "OK"), ("cancelled", "CANCELLED"), ("cancelled", "OK"), ("invalid", "INVALID_ARGUMENT")}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        if args.quick:
            from harness.tiny import tiny_model_for

            args.target = args.draft = tiny_model_for(cleanup)
        dtype = ("--dtype", args.dtype) if args.dtype else ()
        stack = cleanup.enter_context(ServiceStack(target_model=args.target, draft_model=args.draft, log_dir=args.out / "logs",
                                                   replicas=args.replicas, extra_target_args=dtype))
        references = greedy_references(stack, args.max_new_tokens)
        started = time.monotonic()
        outcomes: collections.Counter = collections.Counter()
        deadline = started + args.minutes * 60
        stop, kills, samples = threading.Event(), [], {}
        sampler = threading.Thread(target=sample_memory, args=(stack, stop, samples), daemon=True)
        sampler.start()
        killer = None
        if args.kill_every_s:
            every = tuple(float(v) for v in args.kill_every_s.split(","))
            killer = threading.Thread(target=chaos, args=(stack, every, random.Random(args.seed - 1), stop, kills), daemon=True)
            killer.start()

        async def clients():
            await asyncio.gather(*(
                client(stack.address("orchestrator"), deadline, random.Random(args.seed + i), args, outcomes, references)
                for i in range(args.concurrency)
            ))

        asyncio.run(clients())
        stop.set()
        if killer is not None:
            killer.join()
        sampler.join()
        seconds = time.monotonic() - started
        held = sessions_held(stack)
    summary = report(args, outcomes, memory_lifetimes(samples), held, seconds, kills)
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"written to {args.out / 'soak.json'}")


if __name__ == "__main__":
    main()
