"""Shared fixtures: the embedded tokenizer, tiny random models that use it, and service stacks."""

from __future__ import annotations

import pytest
import torch

from harness.tiny import tiny_lm

# Tiny models gain nothing from intra-op threads, and on a 2-core machine shared with the services
# of the slow tests, thread oversubscription makes every forward several times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (the embedded model's; converted from GGUF once and cached)."""
    from orchestrator.server import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture(scope="session")
def tiny_target(tokenizer):
    return tiny_lm(seed=1, vocab_size=len(tokenizer), tokenizer=tokenizer, name="tiny-target")


@pytest.fixture(scope="session")
def tiny_draft(tokenizer):
    """A random draft: it agrees with tiny_target almost never."""
    return tiny_lm(seed=2, vocab_size=len(tokenizer), tokenizer=tokenizer, name="tiny-draft")


@pytest.fixture(scope="module")
def stack(tiny_target):
    """The default stack of a test module: the tiny target served with itself as the draft (every
    draft accepted). Modules that need another stack define their own `stack`."""
    from draft_service.drafters.model import ModelDrafter
    from harness.inprocess import start_stack
    from harness.tiny import with_eos

    target = with_eos(tiny_target, ())
    running = start_stack(target, ModelDrafter(target))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def orchestrator(stack):
    """A stub of the orchestrator of the module's own `stack` fixture."""
    from specdec.v1 import orchestrator_pb2_grpc

    with stack.channel("orchestrator") as channel:
        yield orchestrator_pb2_grpc.OrchestratorStub(channel)
