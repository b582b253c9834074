"""Regenerate the Python code of protos/specdec/v1 and the protoset that ghz and grpcurl read.

    python protos/generate.py            # writes specdec/v1/*_pb2*.py(i) and protos/specdec.protoset
    python protos/generate.py --out DIR  # writes the same files under DIR (the staleness test)

The generated code is committed, so the services run without grpcio-tools; tests/test_protos.py
regenerates into a temporary directory and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTOSET = Path("protos") / "specdec.protoset"


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "specdec" / "v1").glob("*.proto"))


def generated_files() -> list[Path]:
    """Paths, relative to the output root, of every file `generate` writes."""
    stems = [Path(f).with_suffix("") for f in proto_files()]
    code = [Path(f"{s}_pb2{ext}") for s in stems for ext in (".py", ".pyi")]
    services = [Path(f"{s}_pb2_grpc.py") for s in stems]
    return sorted(code + services) + [PROTOSET]


def generate(out: Path) -> None:
    from grpc_tools import protoc

    (out / PROTOSET).parent.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--descriptor_set_out={out / PROTOSET}",
        "--include_imports",
        "--include_source_info",
        *proto_files(),
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    generate(parser.parse_args().out)
