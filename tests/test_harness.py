"""The harness's layout of services on cores (harness/processes.py): the CPU analogue of separate
GPUs that `python -m bench.demo --pin` uses."""

from __future__ import annotations

import os

from harness import processes


def test_separate_cores_gives_the_target_a_core_of_its_own(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 7})
    layout = processes.separate_cores()
    assert layout == {"target": {3}, "draft": {5}, "orchestrator": {5}}
    assert not layout["target"] & (layout["draft"] | layout["orchestrator"])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert processes.separate_cores() is None  # one core: nothing to separate


def test_pinned_model_services_run_one_thread_per_core(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(processes.subprocess, "Popen", lambda command, **options: started.append((command, options)) or object())
    stack = processes.ServiceStack(log_dir=tmp_path, cores={"target": {0}, "draft": {1}, "orchestrator": {1}})
    for name in ("target", "draft", "orchestrator"):
        stack.spawn(name)
    (target, target_options), (draft, _), (orchestrator, _) = started
    assert target[-2:] == ["--threads", "1"] and draft[-2:] == ["--threads", "1"] and "--threads" not in orchestrator
    assert target_options["preexec_fn"] is not None
