"""The runtime the two model services share: one model worker thread, the session RPCs (model
info, start, end) over the batching scheduler, and the service's life: start serving at once
(NOT_SERVING), load and warm up the engine, report SERVING, expire idle sessions, drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from specdec import metrics, native, wire
from specdec.errors import Unavailable
from specdec.grammar import Grammar
from specdec.model_service.batching import BatchingConfig, BatchScheduler
from specdec.rpc.server import Server, create_server, server_options, stop_requested, unless_stopped
from specdec.sessions import SessionLimits
from specdec.v1 import common_pb2

log = logging.getLogger(__name__)


def batching_config(config) -> BatchingConfig:
    """BatchingConfig from a ModelServiceConfig."""
    return BatchingConfig(
        max_batch_items=config.max_batch_items, max_wait_s=config.batch_wait_ms / 1000, max_queued_items=config.max_queued_items
    )


def session_limits(config) -> SessionLimits:
    """SessionLimits from a ModelServiceConfig."""
    return SessionLimits(max_sessions=config.max_sessions, max_bytes=config.max_cache_mb << 20, ttl_s=config.session_ttl_s)


@dataclass
class RunningModelService:
    server: Server
    servicer: "SessionServicerBase"
    worker: ModelWorker
    expiry: asyncio.Task
    metrics: metrics.MetricsEndpoint | None = None
    untrack_sessions: Callable[[], None] = lambda: None
    companions: tuple = ()  # servicers of the other services on the same server and worker

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace_s: float = 0.0) -> None:
        """Drain (new sessions refused, open ones served until their orchestrators end them or
        `grace_s` passes), then stop."""
        self.expiry.cancel()
        await self.server.drain(grace_s, lambda: len(self.servicer.engine.sessions))
        for servicer in (self.servicer, *self.companions):
            await servicer.scheduler.close()
        self.worker.shutdown()
        self.untrack_sessions()
        if self.metrics is not None:
            await self.metrics.close()


async def start_model_service(
    config,
    servicer: "SessionServicerBase",
    add_to_server: Callable,
    service_name: str,
    load_engine: Callable[[], object],
    companions: tuple[tuple[str, "SessionServicerBase"], ...] = (),
) -> RunningModelService:
    """Start serving at once (health NOT_SERVING, model RPCs UNAVAILABLE) and the metrics
    endpoint when configured, load and warm up the engine on the model worker, then report
    SERVING. `companions`: (service name, servicer) of other services `add_to_server` registers
    on the same server, sharing the worker (`load_engine` gives them their engines)."""
    if config.threads:
        # torch's threads thrash when another process holds one of the cores they spin on, and so
        # would the native formats' (one thread unless the service says which cores it owns)
        torch.set_num_threads(config.threads)
        native.set_threads(config.threads)
    server = create_server(
        f"{config.host}:{config.port}",
        lambda s: add_to_server(servicer, s),
        (service_name, *(name for name, _ in companions)),
        server_options(config),
        opening=tuple(f"/{name}/StartSession" for name in (service_name, *(name for name, _ in companions))),
    )
    await server.start()
    endpoint = metrics.serve(config.host, config.metrics_port)
    log.info("%s listening on %s:%d, loading the model", service_name, config.host, server.port)
    started = time.perf_counter()
    try:
        engine = await servicer.worker.run(load_engine)
    except BaseException:
        await server.stop(0)
        if endpoint is not None:
            await endpoint.close()
        raise
    servicer.engine = engine
    label = metrics.service_label(service_name)
    untrack = metrics.track_sessions(label, lambda: len(engine.sessions))
    info = engine.info()
    metrics.record_model_info(label, info)
    await server.set_serving(True)
    log.info("%s SERVING after %.1f s of loading and warm-up", service_name, time.perf_counter() - started)
    if info.weight_format:
        log.info("%s weights: %s (%s)", service_name, info.weight_format, info.weight_format_reason)
    if info.forward_cost:
        first = info.forward_cost[0][1]
        log.info("%s cost curve T(n)/T(1): %s (T(1) = %.1f ms)", service_name,
                 " ".join(f"{n}:{s / first:.2f}" for n, s in info.forward_cost), 1000 * first)
    expiry = asyncio.create_task(expire_sessions_forever(engine, servicer.worker, min(60.0, config.session_ttl_s / 4)))
    return RunningModelService(server, servicer, servicer.worker, expiry, endpoint, untrack, tuple(c for _, c in companions))


async def run_model_service(config, start: Callable) -> None:
    """A service's main: start it, serve until SIGTERM, drain, stop."""
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop = stop_requested()
    service = await unless_stopped(start(config), stop)
    if service is None:
        # Stopped while loading: nothing was served, so nothing to drain; and the model worker's
        # thread, still loading, would hold a normal exit until it finished (minutes, at times).
        log.info("stopped before the model was loaded")
        logging.shutdown()
        os._exit(0)
    await stop.wait()
    log.info("stopping: draining in-flight calls for up to %.1f s", config.grace_s)
    await service.stop(config.grace_s)


def timed(fn: Callable) -> Callable:
    """fn, returning (its result, the seconds it took)."""

    @functools.wraps(fn)
    def call(*args):
        started = time.perf_counter()
        result = fn(*args)
        return result, time.perf_counter() - started

    return call


class ModelWorker:
    """One thread that runs all model work of a service, in arrival order. Engines are not
    thread-safe, and a long forward pass must not block the event loop (health checks, new calls)."""

    def __init__(self, name: str):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._last: Future | None = None  # the thread runs its work in order: when this is done, all is

    async def run(self, fn: Callable, *args):
        self._last = self._executor.submit(fn, *args)
        return await asyncio.wrap_future(self._last)

    @property
    def idle(self) -> bool:
        """Nothing handed to the thread is under way."""
        return self._last is None or self._last.done()

    async def timed(self, fn: Callable, *args, here: bool = False) -> tuple[object, float]:
        """fn(*args) and the seconds it took inside the worker (queueing excluded). `here`: run it
        on the calling thread (the event loop) when the thread has nothing under way, sparing the
        hand-off to the thread and back (two thread wake-ups: 0.3-0.5 ms a call on a 2-core VM,
        bench.grpc_floor); for short work while nothing else waits. Engine calls never overlap
        either way: all model work is handed out by the event loop, which is busy until `fn`
        returns, and work already handed to the thread has finished."""
        if here and self.idle:
            return timed(fn)(*args)
        return await self.run(timed(fn), *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class SessionServicerBase:
    """The RPCs the draft and target services share: model info and the session life cycle, and
    the batching scheduler (specdec/batching.py) through which all their model work runs.
    `engine` has info(), start_session(id, prompt, prompt_len, grammar) and end_session(id); a subclass provides
    `run_batch(calls)`, the engine call that serves several fused calls, and its metrics labels."""

    service = "model"  # the `service` label of its metrics
    batched_rpc = ""  # the RPC whose calls are fused into batches

    def __init__(self, worker: ModelWorker, batching: BatchingConfig = BatchingConfig(), engine=None):
        self.worker = worker
        self._engine = engine
        self.scheduler = BatchScheduler(worker, lambda calls: self.run_batch(calls), batching, tokens_of=self.tokens_of)
        self.scheduler.on_batch = self._observe_batch
        # the labelled series, looked up once: a lookup per batch costs ~10 us of every round
        self._batch_size = metrics.BATCH_SIZE.labels(service=self.service, rpc=self.batched_rpc)
        self._queue_time = metrics.QUEUE_TIME.labels(service=self.service)
        metrics.QUEUE_LENGTH.labels(service=self.service).set_function(lambda: self.scheduler.queued_items)

    def run_batch(self, calls: list) -> list:
        raise NotImplementedError

    @staticmethod
    def tokens_of(item) -> int:
        """Tokens an item adds to its batch's forward pass."""
        return 1

    def _observe_batch(self, items: int, queue_seconds: list[float]) -> None:
        self._batch_size.observe(items)
        for seconds in queue_seconds:
            self._queue_time.observe(seconds)

    @property
    def engine(self):
        if self._engine is None:
            raise Unavailable("the model is still loading")
        return self._engine

    @engine.setter
    def engine(self, engine) -> None:
        self._engine = engine

    async def GetModelInfo(self, request, context):
        return wire.model_info_to_proto(await self.scheduler.job(self.engine.info, urgent=True))

    async def StartSession(self, request, context):
        grammar = wire.grammar_from_proto(request.grammar, request.HasField("grammar"), "grammar")
        seconds = await self.start_session(request.session_id, list(request.prompt_token_ids), request.prompt_len, grammar)
        return common_pb2.StartSessionResponse(compute_seconds=seconds)

    async def start_session(self, session_id: str, prompt: list[int], prompt_len: int = 0, grammar: Grammar | None = None) -> float:
        """Open and prefill a session between batches; seconds of compute."""
        return await self.scheduler.job(self.engine.start_session, session_id, prompt, prompt_len, grammar)

    async def EndSession(self, request, context):
        self.scheduler.forget(request.session_id)
        existed = await self.scheduler.job(self.engine.end_session, request.session_id, urgent=True)
        return common_pb2.EndSessionResponse(existed=existed)


async def expire_sessions_forever(engine, worker: ModelWorker, every_s: float) -> None:
    """Drop sessions whose TTL passed (their orchestrator crashed or forgot them)."""
    while True:
        await asyncio.sleep(every_s)
        expired = await worker.run(engine.sessions.expire)
        if expired:
            log.warning("expired %d idle sessions: %s", len(expired), ", ".join(expired[:5]))
