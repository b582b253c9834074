"""Start the three services as separate processes on loopback, wait until all report SERVING, and
stop them (SIGTERM) on exit. Used by the demo, the benchmarks and the tests that need real
processes (kill -9, SIGTERM, network namespaces).

    with ServiceStack(draft_model="ngram") as stack:
        stub = stack.orchestrator_stub()
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from harness.probes import free_port, wait_serving
from specdec.v1 import orchestrator_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def separate_cores() -> dict[str, set[int]] | None:
    """The CPU analogue of separate GPUs: the target alone on the first core this process may use,
    draft and orchestrator on the next; None with fewer than two cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    return {"target": {cores[0]}, "draft": {cores[1]}, "orchestrator": {cores[1]}}


class ServiceStack:
    def __init__(self, target_model: str = "embedded", draft_model: str = "ngram", log_dir: Path | None = None,
                 extra_target_args: tuple[str, ...] = (), extra_draft_args: tuple[str, ...] = (), startup_timeout_s: float = 900,
                 extra_orchestrator_args: tuple[str, ...] = (), cores: dict[str, set[int]] | None = None,
                 orchestrator_variants: dict[str, tuple[str, ...]] | None = None, replicas: int = 1, self_draft: str = ""):
        """`cores`: per service the CPUs its process may run on (model services then run as many
        threads); None: every service may run anywhere. `orchestrator_variants`: further
        orchestrators over the same model services, by name, with these extra flags each (e.g.
        {"pipelined": ("--pipeline-drafts",)}); they run on the orchestrator's cores.
        `replicas`: processes of each model service ("target", "target-2", ...; "draft", ...),
        all of them given to the orchestrators. `self_draft`: no draft service; the targets draft
        for themselves (their --self-draft) and are the orchestrators' drafts too."""
        self.cores = cores or {}
        self.variants = dict(orchestrator_variants or {})
        self.targets = ["target"] + [f"target-{i}" for i in range(2, replicas + 1)]
        self.drafts = [] if self_draft else ["draft"] + [f"draft-{i}" for i in range(2, replicas + 1)]
        if self_draft:
            extra_target_args = (*extra_target_args, "--self-draft", self_draft)
        self.ports = {name: free_port() for name in (*self.targets, *self.drafts, "orchestrator", *self.variants)}
        self.log_dir = log_dir or ROOT / ".logs"
        self.startup_timeout_s = startup_timeout_s
        self.commands = {
            **{name: ["target_service", "--model", target_model, *extra_target_args] for name in self.targets},
            **{name: ["draft_service", "--model", draft_model, *extra_draft_args] for name in self.drafts},
            "orchestrator": [
                "orchestrator", "--target", ",".join(map(self.address, self.targets)),
                "--draft", ",".join(map(self.address, self.drafts or self.targets)),
                "--tokenizer", target_model, *extra_orchestrator_args,
            ],
        }
        for name, flags in self.variants.items():
            self.commands[name] = [*self.commands["orchestrator"], *flags]
        self.processes: dict[str, subprocess.Popen] = {}

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def __enter__(self) -> "ServiceStack":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.commands:
                self.spawn(name)
            for name in self.processes:
                self._wait_serving(name)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def route_orchestrator(self, target: str, draft: str) -> None:
        """Have the orchestrator reach the model services at these addresses (a delay proxy's,
        harness/netem.py) instead of directly; before entering."""
        for name in ("orchestrator", *self.variants):
            command = self.commands[name]
            command[command.index("--target") + 1] = target
            command[command.index("--draft") + 1] = draft

    def spawn(self, name: str) -> subprocess.Popen:
        """Start one service's process on its port (again, after a crash: its log is appended to)."""
        module, *args = self.commands[name]
        cores = self.cores.get("orchestrator" if name in self.variants else name.split("-")[0])
        if cores and module != "orchestrator":
            args = [*args, "--threads", str(len(cores))]
        log = open(self.log_dir / f"{name}.log", "a" if name in self.processes else "w")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", module, "--port", str(self.ports[name]), *args],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        )
        log.close()  # the child holds its own descriptor
        return self.processes[name]

    def restart(self, name: str) -> None:
        """Start a service that died (or was killed) on the same port, and wait until it serves."""
        self.spawn(name)
        self._wait_serving(name)

    def _wait_serving(self, name: str) -> None:
        wait_serving(self.address(name), self.processes[name], self.startup_timeout_s, self.log_dir / f"{name}.log")

    def orchestrator_stub(self, channel: grpc.Channel | None = None, name: str = "orchestrator") -> orchestrator_pb2_grpc.OrchestratorStub:
        """A stub of the orchestrator, or of the variant `name`."""
        return orchestrator_pb2_grpc.OrchestratorStub(channel or grpc.insecure_channel(self.address(name)))

    def __exit__(self, *exc) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
