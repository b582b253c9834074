"""Configuration and start-up of the orchestrator: connect to the model services, check that
tokenizer, target and draft share one vocabulary, then serve: gRPC, and with --http-port the
OpenAI-compatible HTTP API (orchestrator/openai_api/) in the same event loop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Callable

import grpc

from orchestrator.backends import GrpcDraft, GrpcTarget
from orchestrator.breaker import CircuitBreaker, GuardedDraft
from orchestrator.generation import GenerationEngine, check_compatible
from orchestrator.health import RECONNECT_OPTIONS, first_serving, follow_replicas
from orchestrator.replicas import DNS_SCHEME, DraftReplicas, Replica, ReplicaSet, TargetReplicas, resolve
from orchestrator.openai_api.app import HttpApi, RunningHttp
from orchestrator.openai_api.app import serve as serve_http
from orchestrator.policy import KSettings
from orchestrator.servicer import METRICS_SERVICE, OrchestratorServicer
from specdec import metrics
from specdec.config import ServerConfig, option
from specdec.errors import SpecdecError, Unavailable
from specdec.messages import ModelInfo
from specdec.models import vocab_fingerprint
from specdec.rpc.interceptors import read_tokens
from specdec.rpc.server import Server, channel_options, create_server, server_options
from specdec.rpc.tls import channel_credentials
from specdec.v1 import orchestrator_pb2, orchestrator_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name


@dataclass
class OrchestratorConfig(ServerConfig):
    port: int = option(50050, "port to listen on; 0 picks a free one")
    target: str = option("127.0.0.1:50051", "target service: host:port, replicas as a comma-separated list, or dns:///name:port (all its addresses)")
    draft: str = option("127.0.0.1:50052", "draft service, as --target (one or more replicas); empty: target-only decoding")
    tokenizer: str = option("embedded", "the target's tokenizer: a Hugging Face directory, a hub id, a .gguf file, or 'embedded'")
    num_speculative_tokens: int = option(
        4, "K of requests that leave num_speculative_tokens unset: drafted every round, or with --adaptive-k the most per round"
    )
    adaptive_k: bool = option(
        True, "for requests that leave K unset, choose K per round from acceptance, batch size and the target's cost curve"
    )
    max_speculative_tokens: int = option(
        16, "largest num_speculative_tokens a request may ask for; rounds are capped further at what target and draft accept"
    )
    max_new_tokens: int = option(4096, "largest max_new_tokens a request may ask for")
    pipeline_drafts: bool = option(
        False, "propose each round during the previous one's Verify, guessing all drafts accepted (pays when draft and target own cores)"
    )
    round_streams: bool = option(
        True, "send a session's rounds on one bidirectional stream per service (VerifyStream, ProposeStream); off: a call per round"
    )
    draft_tree: str = option(
        "", "draft trees: children per node by depth, '4,2,1' (static, K deep), '4,2,1/16' (16 nodes, dynamic) or auto; '': chains"
    )
    request_timeout_s: float = option(600.0, "deadline of a request whose client set none")
    connect_timeout_s: float = option(900.0, "at start-up, how long to wait for the model services to load")
    draft_timeout_ms: float = option(
        2000.0, "longest wait for one draft call (session start, proposal); past it the request goes on target-only. 0 = no limit"
    )
    draft_breaker_failures: int = option(
        3, "consecutive draft failures that open the circuit breaker: new requests skip the draft"
    )
    draft_breaker_cooldown_s: float = option(
        10.0, "while the breaker is open, one request per this many seconds probes the draft"
    )
    target_health_period_s: float = option(
        1.0, "seconds between health checks of every replica (and dns:/// lookups); NOT_SERVING while no target replica is reachable"
    )
    auth_token_file: str = option(
        "", "file of bearer tokens, one per line: calls must send 'authorization: Bearer <token>' (health exempt); empty = none"
    )
    upstream_tls_ca_file: str = option(
        "", "PEM CA certificates that signed the target's and draft's certificates: connect to them over TLS; empty = plaintext"
    )
    upstream_tls_cert_file: str = option("", "PEM client certificate presented to the target and draft (their --tls-client-ca-file: mutual TLS)")
    upstream_tls_key_file: str = option("", "PEM private key of --upstream-tls-cert-file")
    upstream_tls_server_name: str = option(
        "", "name the target's and draft's certificates must carry instead of the host in --target/--draft (e.g. for an IP address)"
    )
    http_port: int = option(
        0, "port of the OpenAI-compatible HTTP API (docs/http-api.md) on --host, with the gRPC port's TLS and tokens; 0 = off"
    )
    served_model_name: str = option("", "the model's name in the HTTP API (/v1/models; requests must name it); empty = the target's --model")


@dataclass
class Serving:
    """The orchestrator's health as both ports report it: the status last set on the gRPC health
    service (follow_target_health sets it through here), and whether the server drains."""

    server: Server
    serving: bool = False

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        await self.server.set_serving(serving)

    @property
    def draining(self) -> bool:
        return self.server.gate.closed

    def __call__(self) -> bool:
        return self.serving and not self.draining


@dataclass
class RunningOrchestrator:
    server: Server
    servicer: OrchestratorServicer
    replica_sets: list[ReplicaSet]  # the target's, and the draft's when there is one
    metrics: metrics.MetricsEndpoint | None = None
    untrack_sessions: Callable[[], None] = lambda: None
    target_watch: asyncio.Task | None = None  # follows every replica's health (orchestrator/health.py)
    http: RunningHttp | None = None  # the HTTP API (--http-port)

    @property
    def http_port(self) -> int:
        return self.http.port if self.http is not None else 0

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace_s: float = 0.0) -> None:
        """Drain (new generations refused, running ones finish within `grace_s`), then stop."""
        if self.target_watch is not None:
            self.target_watch.cancel()  # before draining: it would report SERVING again
        await self.server.drain(grace_s, lambda: self.servicer.running)  # HTTP generations included
        if self.http is not None:
            await self.http.stop()  # before the channels close: cancelled generations end their sessions
        for replica in (r for replicas in self.replica_sets for r in replicas.replicas):
            await replica.channel.close()
        self.untrack_sessions()
        if self.metrics is not None:
            await self.metrics.close()


def upstream_channel(config: OrchestratorConfig, address: str) -> grpc.aio.Channel:
    """A channel to a model service: TLS when any --upstream-tls-* file is set (verified against
    the CA file, else the system's roots; with a client certificate: mutual TLS), else plaintext."""
    options = channel_options(config.max_message_mb << 20, config.keepalive_s) + RECONNECT_OPTIONS
    if not (config.upstream_tls_ca_file or config.upstream_tls_cert_file or config.upstream_tls_key_file):
        return grpc.aio.insecure_channel(address, options=options)
    if config.upstream_tls_server_name:
        options.append(("grpc.ssl_target_name_override", config.upstream_tls_server_name))
    credentials = channel_credentials(config.upstream_tls_ca_file, config.upstream_tls_cert_file, config.upstream_tls_key_file)
    return grpc.aio.secure_channel(address, credentials, options=options)


def replica(config: OrchestratorConfig, address: str, role: str) -> Replica:
    """A replica at `address`: a target, or a draft behind its own timeout and circuit breaker."""
    channel = upstream_channel(config, address)
    if role == "target":
        return Replica(address, GrpcTarget(channel, config.round_streams), channel)
    breaker = CircuitBreaker(config.draft_breaker_failures, config.draft_breaker_cooldown_s)
    return Replica(address, GuardedDraft(GrpcDraft(channel, config.round_streams), breaker, config.draft_timeout_ms / 1000), channel)


async def connect(config: OrchestratorConfig, spec: str, role: str, replicas: ReplicaSet) -> ModelInfo:
    """Fill `replicas` with the endpoints of `spec` and wait until one of them serves; its info."""
    addresses = await resolve(spec)
    if not addresses:
        raise Unavailable(f"--{role} {spec!r} names no address")
    replicas.replicas = [replica(config, address, role) for address in addresses]
    first = await first_serving([r.channel for r in replicas.replicas], config.connect_timeout_s, f"{role} service at {spec}")
    for index, other in enumerate(replicas.replicas):
        other.healthy = other.admitted = index == first  # the others join once their health check passes (admit)
    return await replicas.replicas[first].backend.info(timeout=config.connect_timeout_s)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from specdec.models import resolve

    return AutoTokenizer.from_pretrained(resolve(name))


async def start(config: OrchestratorConfig, tokenizer=None) -> RunningOrchestrator:
    """Serve the orchestrator: NOT_SERVING until both model services answered and agree on the
    vocabulary (FailedPrecondition otherwise)."""
    servicer = OrchestratorServicer(config.request_timeout_s)
    tokens = read_tokens(config.auth_token_file)
    server = create_server(
        f"{config.host}:{config.port}",
        lambda s: orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(servicer, s),
        (SERVICE_NAME,),
        replace(server_options(config), bearer_tokens=tokens),
        opening=tuple(f"/{SERVICE_NAME}/{method}" for method in ("Generate", "GenerateStream")),
    )
    await server.start()
    serving = Serving(server)
    targets = TargetReplicas("target")
    drafts = DraftReplicas("draft") if config.draft else None
    running = RunningOrchestrator(
        server, servicer, [targets] + ([drafts] if drafts else []), metrics.serve(config.host, config.metrics_port),
        metrics.track_sessions(METRICS_SERVICE, lambda: servicer.running),
    )
    try:
        if config.http_port:  # listening at once, as the gRPC port: /health answers 503 until SERVING
            api = HttpApi(
                servicer, serving, lambda: serving.draining, config.served_model_name, tokens, config.max_message_mb << 20
            )
            running.http = await serve_http(
                api, config.host, config.http_port, config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file,
                config.log_level,
            )
        target_info = await connect(config, config.target, "target", targets)
        draft_info = await connect(config, config.draft, "draft", drafts) if drafts is not None else None
        tokenizer = tokenizer or load_tokenizer(config.tokenizer)
        check_compatible(target_info, draft_info, vocab_fingerprint(tokenizer))
    except BaseException:
        await running.stop()
        raise
    k_settings = KSettings(config.num_speculative_tokens, config.adaptive_k, config.max_speculative_tokens)
    servicer.engine = GenerationEngine(
        tokenizer, targets, target_info, drafts, draft_info, k_settings, config.max_new_tokens, config.pipeline_drafts,
        config.draft_tree,
    )
    await serving.set_serving(True)

    refused: set[str] = set()  # addresses serving another vocabulary

    async def admit(candidate: Replica) -> bool:
        """A replica's first time serving: it must share the target's vocabulary, and a target
        replica its weight format too (a session rebuilt on it must compute the same logits), or
        it leaves its set."""
        try:
            info = await candidate.backend.info(timeout=config.target_health_period_s * 5)
        except SpecdecError:
            return False
        candidate.admitted = True
        other_format = candidate in targets.replicas and info.weight_format != target_info.weight_format
        if (info.vocab_fingerprint and info.vocab_fingerprint != target_info.vocab_fingerprint) or other_format:
            log.error("replica %s serves %s (%s), not the target's vocabulary and format (%s): not used", candidate.address, info.model,
                      info.weight_format, target_info.weight_format)
            refused.add(candidate.address)
            for replicas in running.replica_sets:
                if candidate in replicas.replicas:
                    replicas.replicas.remove(candidate)
            await candidate.channel.close()
            return False
        return True

    async def refresh() -> None:
        """Endpoints of dns:/// names found again: new ones join (once admitted), vanished ones retire."""
        for replicas, spec in ((targets, config.target), (drafts, config.draft)):
            if replicas is None or DNS_SCHEME not in spec:
                continue
            found = set(await resolve(spec)) - refused
            known = {r.address for r in replicas.replicas}
            replicas.replicas += [replace(replica(config, a, replicas.role), healthy=False) for a in sorted(found - known)]
            for each in replicas.replicas:
                each.retired = each.address not in found

    running.target_watch = asyncio.create_task(
        follow_replicas(targets, drafts, serving, config.target_health_period_s, refresh, admit)
    )
    log.info(
        "orchestrator SERVING on %s:%d: target %s (%s), draft %s (%s)",
        config.host, server.port, config.target, target_info.model, config.draft or "none", draft_info.model if draft_info else "-",
    )
    return running
