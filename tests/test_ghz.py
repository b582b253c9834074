"""ghz, an independent Go gRPC client, against the real services (tiny models, n-gram draft): the
shipped configs for unary and server-streaming calls must end with every request OK."""

from __future__ import annotations

import os

import pytest

from draft_service.drafters.ngram import NGramDrafter
from harness.ghz import CONFIGS, run_ghz, summary_line
from harness.inprocess import start_stack
from harness.tiny import with_eos

pytestmark = pytest.mark.slow  # ghz processes


@pytest.fixture(scope="module")
def stack(tiny_target):
    running = start_stack(with_eos(tiny_target, ()), NGramDrafter())
    yield running
    running.stop()


@pytest.mark.skipif(not os.environ.get("SPECDEC_GHZ"), reason="ghz is installed by `make tools`; `make test` sets SPECDEC_GHZ")
@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.json")), ids=lambda path: path.stem)
def test_ghz_config_runs_with_only_ok_statuses(stack, config, tmp_path):
    report = run_ghz(config, stack.address("orchestrator"), tmp_path / "report.json", {"total": 12, "concurrency": 3, "skipFirst": 0})
    print(summary_line(report))
    assert report["statusCodeDistribution"] == {"OK": 12}
    assert report["count"] == 12 and report["rps"] > 0
