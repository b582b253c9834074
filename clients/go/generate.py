"""Regenerate the Go code of the public API (protos/specdec/v1/orchestrator.proto) for the Go client.

    python clients/go/generate.py            # writes clients/go/specdec/v1/{orchestrator,orchestrator_grpc,common}.pb.go
    python clients/go/generate.py --out DIR  # writes the same files under DIR (the staleness test)

protoc is grpcio-tools' (the one that makes the Python code); the plugins protoc-gen-go and
protoc-gen-go-grpc are the pinned ones `make tools` installs ($SPECDEC_PROTOC_GEN_GO and
$SPECDEC_PROTOC_GEN_GO_GRPC, exported by make; else found on PATH). The generated code is
committed, so `go build` needs neither; tests/test_go_client.py regenerates it and fails when the
committed files differ. Only the public API is generated: applications never call the model
services.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "protos"
PROTO = "specdec/v1/orchestrator.proto"
COMMON = "specdec/v1/common.proto"  # the public API imports its Grammar message
GO_PACKAGE = "specdec/clients/go/specdec/v1;specdecv1"  # import path (module in go.mod + folder); package name
GENERATED = [Path("specdec/v1/orchestrator.pb.go"), Path("specdec/v1/orchestrator_grpc.pb.go"), Path("specdec/v1/common.pb.go")]


def plugin(name: str) -> str:
    found = os.environ.get("SPECDEC_" + name.upper().replace("-", "_")) or shutil.which(name)
    if not found or not Path(found).exists():
        raise FileNotFoundError(f"{name} is not installed: run `make tools` (go install of the pinned version)")
    return found


def generate(out: Path) -> None:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-go={plugin('protoc-gen-go')}",
        f"--plugin=protoc-gen-go-grpc={plugin('protoc-gen-go-grpc')}",
        # the protos carry no go_package option (it would tie them to this client); M maps the file
        f"--go_out={out}",
        f"--go_opt=paths=source_relative,M{PROTO}={GO_PACKAGE},M{COMMON}={GO_PACKAGE}",
        PROTO,
        COMMON,
    ]
    services = [  # the model services' RPCs (in common.proto's neighbours) are not the client's business
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-go-grpc={plugin('protoc-gen-go-grpc')}",
        f"--go-grpc_out={out}",
        f"--go-grpc_opt=paths=source_relative,M{PROTO}={GO_PACKAGE},M{COMMON}={GO_PACKAGE}",
        PROTO,
    ]
    if protoc.main(args) != 0 or protoc.main(services) != 0:
        sys.exit("protoc failed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE, help="output root (default: clients/go)")
    generate(parser.parse_args().out)
