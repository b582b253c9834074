"""Command lines: every flag documented in --help with its environment variable, and the
precedence flag > environment > default."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.run import DistillConfig
from draft_service.server import DraftConfig
from orchestrator.server import OrchestratorConfig
from specdec.config import parse
from target_service.server import TargetConfig

ROOT = Path(__file__).resolve().parent.parent
SERVICES = [("target_service", TargetConfig, "SPECDEC_TARGET"), ("draft_service", DraftConfig, "SPECDEC_DRAFT"), ("orchestrator", OrchestratorConfig, "SPECDEC_ORCHESTRATOR")]


@pytest.mark.slow  # three interpreters importing torch
@pytest.mark.parametrize("module,config,prefix", SERVICES)
def test_help_explains_every_flag(module, config, prefix):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    for field in dataclasses.fields(config):
        assert f"--{field.name.replace('_', '-')}" in help_text
        assert f"{prefix}_{field.name.upper()}" in help_text


@pytest.mark.parametrize("config", [config for _, config, _ in SERVICES] + [DistillConfig])
def test_help_strings_fit_a_terminal_line(config):
    for field in dataclasses.fields(config):
        flag = "--" + field.name.replace("_", "-")
        assert len(field.metadata["help"]) <= 120, f"{flag}: {len(field.metadata['help'])} characters"


def test_flags_override_environment_which_overrides_defaults(monkeypatch):
    monkeypatch.setenv("SPECDEC_TARGET_PORT", "6001")
    monkeypatch.setenv("SPECDEC_TARGET_DEVICE", "cuda:1")
    monkeypatch.setenv("SPECDEC_TARGET_REFLECTION", "false")
    config = parse(TargetConfig, "t", "SPECDEC_TARGET", "", ["--port", "7001"])
    assert (config.port, config.device, config.reflection, config.dtype) == (7001, "cuda:1", False, "auto")


def test_client_streams_a_generation(tiny_target):
    from harness.inprocess import start_stack
    from harness.tiny import with_eos
    from orchestrator.client import main

    stack = start_stack(with_eos(tiny_target, ()), None)
    try:
        assert main(["--address", stack.address("orchestrator"), "--raw", "--max-new-tokens", "5", "Hello"]) == 0
        assert main(["--address", stack.address("orchestrator"), "--max-new-tokens", "0", "Hello"]) == 1
    finally:
        stack.stop()
