"""Typed configuration: each service's settings are one dataclass, and one function turns it into
a command line whose every flag has an environment-variable equivalent and a help text.

    @dataclass
    class TargetConfig(ModelServiceConfig): ...
    config = parse(TargetConfig, "target_service", "SPECDEC_TARGET", description)

A field `max_sessions` becomes `--max-sessions` and `SPECDEC_TARGET_MAX_SESSIONS`; precedence is
flag, then environment variable, then the field's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field

from specdec.weights import AUTO, FORMATS


def option(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ServerConfig:
    host: str = option("127.0.0.1", "address to listen on; 0.0.0.0 for every interface")
    port: int = option(0, "port to listen on; 0 picks a free one")
    reflection: bool = option(True, "serve gRPC server reflection (grpcurl, Postman)")
    grace_s: float = option(
        10.0, "on SIGTERM: NOT_SERVING and new work refused at once; seconds the work in flight gets to finish before the server stops"
    )
    max_message_mb: int = option(16, "largest gRPC message sent or received, in MiB")
    max_concurrent_rpcs: int = option(
        0, "calls served at once; beyond, RESOURCE_EXHAUSTED (health checks and sessions' round streams count); 0 = no limit",
    )
    tls_cert_file: str = option("", "PEM certificate (chain) of this server: serve TLS; empty = plaintext")
    tls_key_file: str = option("", "PEM private key of --tls-cert-file")
    tls_client_ca_file: str = option(
        "", "PEM CA certificates: clients must present a certificate one of them signed (mutual TLS); empty = none asked",
    )
    keepalive_s: float = option(30.0, "seconds between HTTP/2 keepalive pings")
    log_level: str = option("INFO", "logging level", ("DEBUG", "INFO", "WARNING", "ERROR"))
    metrics_port: int = option(0, "port of the Prometheus metrics endpoint (HTTP, on --host); 0 = no metrics endpoint")


@dataclass
class ModelServiceConfig(ServerConfig):
    model: str = option("embedded", "a local Hugging Face directory, a hub id, a .gguf file, or 'embedded' (SmolLM2-135M-Instruct)")
    device: str = option("cpu", "torch device, e.g. cpu, cuda, cuda:1")
    dtype: str = option(
        AUTO, "weight format: auto times each at warm-up and keeps the fastest (specdec/weights.py)", (AUTO, *FORMATS)
    )
    threads: int = option(0, "model threads: the cores this service owns; 0 = torch's default (every core), native formats one")
    max_sessions: int = option(256, "sessions held at once; more is RESOURCE_EXHAUSTED")
    max_cache_mb: int = option(4096, "KV cache memory of all sessions, in MiB; more is RESOURCE_EXHAUSTED")
    session_ttl_s: float = option(600.0, "a session unused this long is dropped (its orchestrator is gone)")
    max_speculative_tokens: int = option(16, "largest K accepted per round")
    max_batch_items: int = option(32, "most sequences fused from concurrent calls into one forward pass")
    batch_wait_ms: float = option(
        50.0, "how long a batch waits for the other recently active sessions' calls before running without them (at most half a pass)"
    )
    max_queued_items: int = option(1024, "sequences waiting for a forward pass before new calls get RESOURCE_EXHAUSTED")


def _env_name(prefix: str, name: str) -> str:
    return f"{prefix}_{name.upper()}"


def _convert(kind, text: str):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    return kind(text)


def parser_for(cls, prog: str, env_prefix: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        env = _env_name(env_prefix, f.name)
        default = _convert(kind, os.environ[env]) if env in os.environ else f.default
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [env {env}]"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"), help=help_text)
    return parser


def parse(cls, prog: str, env_prefix: str, description: str, argv: list[str] | None = None):
    """An instance of the dataclass `cls` from flags, environment variables and defaults."""
    arguments = parser_for(cls, prog, env_prefix, description).parse_args(argv)
    return cls(**vars(arguments))
