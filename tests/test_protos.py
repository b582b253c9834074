"""The committed generated code and protoset must be what protos/generate.py makes from protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)


def test_generated_code_is_up_to_date(tmp_path):
    generate.generate(tmp_path)
    stale = [str(p) for p in generate.generated_files() if (tmp_path / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not stale, f"regenerate with `make protos`: {stale}"


def test_protoset_holds_every_service_with_its_imports():
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString((ROOT / generate.PROTOSET).read_bytes()).file
    services = {f"{f.package}.{s.name}" for f in files for s in f.service}
    assert services == {"specdec.v1.Orchestrator", "specdec.v1.DraftService", "specdec.v1.TargetService"}
    assert "specdec/v1/common.proto" in {f.name for f in files}
