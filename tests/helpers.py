"""What only the tests need: joining streamed events, reading BadRequest details, TLS
certificates made with openssl, and a tiny target with training data for the distillation CLIs. Models and service stacks are in harness/, shared with bench/."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def joined(events) -> tuple[list[int], str]:
    return [t for e in events for t in e.token_ids], "".join(e.text for e in events)


def bad_request_fields(error: grpc.RpcError) -> list[str]:
    """The fields a call's error names in its BadRequest details (none: no such detail)."""
    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [violation.field for violation in bad_request.field_violations]
    return fields


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA; a server certificate (127.0.0.1 and localhost) and a client certificate,
    both signed by it; and another CA that signed neither."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str


def openssl(*arguments: str) -> None:
    subprocess.run(["openssl", *arguments], check=True, capture_output=True, timeout=60)


# P-256 keys: made in milliseconds, where RSA keys take a noticeable part of a second each.
NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(directory: Path, name: str) -> tuple[str, str]:
    """A self-signed CA valid for a day: (certificate, key) paths."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl("req", "-x509", *NEW_KEY, "-days", "1", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert))
    return str(cert), str(key)


def make_leaf(directory: Path, name: str, ca: tuple[str, str], extensions: str) -> tuple[str, str]:
    """A certificate signed by `ca` with the given X.509v3 `extensions` (openssl extfile lines):
    (certificate, key) paths."""
    cert, key, request, extfile = (directory / f"{name}.{suffix}" for suffix in ("pem", "key", "csr", "ext"))
    extfile.write_text(extensions)
    openssl("req", "-new", *NEW_KEY, "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(request))
    openssl("x509", "-req", "-in", str(request), "-CA", ca[0], "-CAkey", ca[1], "-days", "1", "-extfile", str(extfile),
            "-out", str(cert))
    return str(cert), str(key)


def make_certificates(directory: Path) -> Certificates:
    """Certificates for TLS and mutual-TLS tests, made with the openssl command."""
    ca = make_ca(directory, "ca")
    # The server's certificate allows client authentication too, as the deployment's single one
    # does (docker/healthcheck.sh presents it to its own service under mutual TLS).
    server_extensions = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
    server = make_leaf(directory, "server", ca, server_extensions)
    client = make_leaf(directory, "client", ca, "extendedKeyUsage=clientAuth\n")
    return Certificates(ca[0], *server, *client, make_ca(directory, "other-ca")[0])


def distillation_inputs(tmp_path: Path, loaded, tokenizer) -> tuple[Path, Path]:
    """`loaded` (a tiny target) saved with `tokenizer`, and a data folder of four GSM8K-style
    questions and one HumanEval stub: (target directory, data directory)."""
    target_dir, data = tmp_path / "target", tmp_path / "data"
    loaded.model.save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)
    data.mkdir()
    (data / "gsm8k_train.jsonl").write_text("".join('{"question": "What is %d plus %d?", "answer": "-"}\n' % (i, i) for i in range(4)))
    (data / "humaneval.jsonl").write_text('{"task_id": "HumanEval/0", "prompt": "def add(a, b):\\n"}\n')
    return target_dir, data
