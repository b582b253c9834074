"""Prometheus metrics of the three services, and the HTTP endpoint that serves them.

Boundary: this module defines every metric (name, type, labels, buckets) and serves the process's
registry over HTTP (`--metrics-port`); the services decide when to record. Names follow vLLM's
(`vllm:spec_decode_num_draft_tokens_total`, `vllm:time_to_first_token_seconds`, ...) with the
prefix `specdec:`, so dashboards written for one read the other with a search and replace.

Every metric carries a `service` label: `orchestrator`, `target` or `draft` (`service_label()`
derives it from the gRPC service name). The metric objects are created once, at import, in
prometheus_client's default registry; several services started in one process (the tests do)
share them and stay apart by that label, and no service registers anything twice.

Who records what:
- the orchestrator, once per request at its end (orchestrator/servicer.py): the spec-decode
  counters, latencies, finish reasons and error codes;
- every service: `specdec:num_sessions_running`, read at scrape time (`track_sessions`);
- the model services' batching scheduler: `BATCH_SIZE` (`specdec:batch_size`, labels service and
  rpc = "Verify" / "Propose": sequences per forward pass), `QUEUE_LENGTH`
  (`specdec:num_requests_waiting`: calls waiting for a forward pass) and `QUEUE_TIME`
  (`specdec:request_queue_time_seconds`: how long each waited), e.g.
  `BATCH_SIZE.labels(service="target", rpc="Verify").observe(len(batch))`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from specdec.errors import SpecdecError

PREFIX = "specdec:"

# Latencies on a CPU run from milliseconds (a token of a tiny model) to minutes (a long answer of
# a large one); buckets roughly double, so a quantile is known within a factor of about 1.5.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 4.0, 6.0, 10.0,
    15.0, 25.0, 40.0, 60.0, 120.0, 300.0, 600.0,
)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


def _name(name: str) -> str:
    return PREFIX + name


# Speculative decoding, counted by the orchestrator (vLLM's SpecDecodingProm names).
DRAFTS = Counter(_name("spec_decode_num_drafts"), "Rounds in which the target verified at least one draft token.", ["service"])
DRAFT_TOKENS = Counter(_name("spec_decode_num_draft_tokens"), "Draft tokens proposed and verified.", ["service"])
ACCEPTED_TOKENS = Counter(_name("spec_decode_num_accepted_tokens"), "Draft tokens the target accepted.", ["service"])
ACCEPTED_PER_POSITION = Counter(
    _name("spec_decode_num_accepted_tokens_per_pos"),
    "Accepted draft tokens by draft position (0 = the first draft token of a round).",
    ["service", "position"],
)
EMITTED_TOKENS = Counter(
    _name("spec_decode_num_emitted_tokens"),
    "Tokens the target committed: accepted drafts plus one recovered or bonus token per round.",
    ["service"],
)
TARGET_FORWARDS = Counter(
    _name("spec_decode_num_target_forward_passes"), "Target forward passes (Verify rounds; prefill not counted).", ["service"]
)
SESSION_REBUILDS = Counter(
    _name("session_rebuilds"), "Sessions started again on a replica after the one holding them failed, by role.", ["service", "role"]
)
GENERATION_TOKENS = Counter(_name("generation_tokens"), "Output tokens of finished requests.", ["service"])

# Requests, as vLLM names them.
TIME_TO_FIRST_TOKEN = Histogram(
    _name("time_to_first_token_seconds"),
    "Seconds from a request's arrival to its first output token.",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    _name("time_per_output_token_seconds"),
    "Per request: seconds after the first output token divided by the tokens that followed it.",
    ["service"],
    buckets=TOKEN_LATENCY_BUCKETS,
)
E2E_LATENCY = Histogram(
    _name("e2e_request_latency_seconds"), "Seconds from a request's arrival to its last token.", ["service"],
    buckets=LATENCY_BUCKETS,
)
REQUEST_SUCCESS = Counter(
    _name("request_success"), "Requests that finished, by finish reason (length, stop, eos).", ["service", "finished_reason"]
)
REQUEST_ERRORS = Counter(_name("request_errors"), "Requests that ended with an error, by gRPC status code.", ["service", "code"])

# Batching and queueing, recorded by the model services' scheduler (see the module docstring).
BATCH_SIZE = Histogram(_name("batch_size"), "Sequences scored in one forward pass.", ["service", "rpc"], buckets=BATCH_BUCKETS)
QUEUE_LENGTH = Gauge(_name("num_requests_waiting"), "Calls waiting for a forward pass.", ["service"])

# The model services' forward passes, set once at warm-up (record_model_info).
WEIGHT_FORMAT = Gauge(_name("weight_format_info"), "1 for the weight format the forward passes run in.", ["service", "format"])
FORWARD_COST = Gauge(
    _name("forward_cost_seconds"), "Seconds of one forward pass scoring `tokens` tokens, measured at warm-up.", ["service", "tokens"]
)


def record_model_info(service: str, info) -> None:
    """The weight format and cost curve of a model service's ModelInfo (specdec.messages)."""
    if info.weight_format:
        WEIGHT_FORMAT.labels(service=service, format=info.weight_format).set(1)
    for tokens, seconds in info.forward_cost:
        FORWARD_COST.labels(service=service, tokens=str(tokens)).set(seconds)
QUEUE_TIME = Histogram(
    _name("request_queue_time_seconds"), "Seconds a call waited before its forward pass began.", ["service"],
    buckets=LATENCY_BUCKETS,
)


def service_label(grpc_service_name: str) -> str:
    """The `service` label of a gRPC service: specdec.v1.TargetService -> target,
    specdec.v1.DraftService -> draft, specdec.v1.Orchestrator -> orchestrator."""
    return grpc_service_name.rsplit(".", 1)[-1].removesuffix("Service").lower()


class _SessionCounts:
    """`specdec:num_sessions_running`, read from the services at scrape time: sessions also end
    by expiring, which a gauge moved by inc/dec at start and end would miss. Several services of
    one kind in a process (tests) are summed."""

    def __init__(self):
        self._sources: dict[int, tuple[str, Callable[[], int]]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # scrapes run on the HTTP server's threads

    def add(self, service: str, count: Callable[[], int]) -> Callable[[], None]:
        key = next(self._ids)
        with self._lock:
            self._sources[key] = (service, count)

        def remove() -> None:
            with self._lock:
                self._sources.pop(key, None)

        return remove

    def collect(self):
        totals: dict[str, int] = defaultdict(int)
        with self._lock:
            sources = list(self._sources.values())
        for service, count in sources:
            totals[service] += count()
        family = GaugeMetricFamily(_name("num_sessions_running"), "Sessions (generations) held right now.", labels=["service"])
        for service, total in sorted(totals.items()):
            family.add_metric([service], total)
        yield family


_SESSIONS = _SessionCounts()
REGISTRY.register(_SESSIONS)


def track_sessions(service: str, count: Callable[[], int]) -> Callable[[], None]:
    """Report `count()` as the service's running sessions from now on; call the returned function
    when the service stops. `count` runs on a scrape thread: it must only read."""
    return _SESSIONS.add(service, count)


def status_code_name(error: BaseException) -> str:
    """The gRPC status code name a request ends with when `error` escapes its handler."""
    if isinstance(error, SpecdecError):
        return error.code_name
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # the client went away
        return "CANCELLED"
    return "INTERNAL"


@contextlib.contextmanager
def count_errors(service: str) -> Iterator[None]:
    """Count an exception escaping the block in `specdec:request_errors_total` by its status code."""
    try:
        yield
    except BaseException as error:
        REQUEST_ERRORS.labels(service=service, code=status_code_name(error)).inc()
        raise


@dataclass
class MetricsEndpoint:
    """The HTTP server of /metrics (any path answers), on its own daemon threads."""

    server: WSGIServer

    @property
    def port(self) -> int:
        return self.server.server_port

    async def close(self) -> None:
        # shutdown() waits for the serving loop's next poll (up to 0.5 s): not on the event loop
        await asyncio.to_thread(self.server.shutdown)
        self.server.server_close()


def serve(host: str, port: int) -> MetricsEndpoint | None:
    """Serve the process's metrics on host:port; None when port is 0 (no endpoint)."""
    if not port:
        return None
    server, _ = prometheus_client.start_http_server(port, addr=host)
    return MetricsEndpoint(server)
