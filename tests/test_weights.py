"""Weight formats (specdec/weights.py): each format's product against float32, int4 groups that
recover Q4_1 weights, batch invariance (a token's logits are the same bits alone, in a verify, or
beside another session's rows), greedy speculation identical to target-only decoding in every
format, and `auto`'s choice on a CPU with and without fast bf16 (timings given, not measured)."""

from __future__ import annotations

import concurrent.futures
import copy

import pytest
import torch

from draft_service.drafters.model import ModelDrafter
from harness.inprocess import in_process_engine, run_generation
from harness.tiny import tiny_lm, with_eos
from orchestrator.generation import GenerationRequest
from specdec import lm, weights
from tests.helpers import joined

PRODUCTS = ("bfloat16", "int8", "int4")  # formats of single products (weights.make_linear)
QUANTIZED = PRODUCTS + weights.NATIVE_FORMATS  # whole-model formats too (specdec/native)
# Worst relative error of a product against float32 (|y - y32| / max |y32|), per format.
PRODUCT_TOLERANCE = {"float32": 1e-6, "bfloat16": 2e-2, "int8": 2e-2, "int4": 0.2}


@pytest.mark.parametrize("format", ["float32", *PRODUCTS])
def test_each_format_multiplies_like_float32(format):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator) * 0.05
    x = torch.randn(5, 64, generator=generator)
    exact = x @ weight.T
    product = weights.make_linear(format, weight)(x.to(weights.activation_dtype(format))).float()
    assert product.shape == (5, 96)
    assert (product - exact).abs().max() / exact.abs().max() < PRODUCT_TOLERANCE[format]


def test_int4_groups_recover_q4_1_weights_exactly():
    """A weight made as GGUF's Q4_1 makes it (w = d * q + m per group of 32, q spanning 0..15)
    quantizes back to the same q, d and m."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (8, 64), generator=generator)
    q[:, ::32], q[:, 1::32] = 0, 15  # every group holds its minimum and its maximum
    d = torch.rand(8, 2, generator=generator) * 0.01 + 1e-3
    m = -torch.rand(8, 2, generator=generator) * 0.1
    weight = (d.repeat_interleave(32, 1) * q + m.repeat_interleave(32, 1)).float()
    got_q, got_d, got_m = weights.int4_blocks(weight)
    assert torch.equal(got_q, q.to(torch.int32))
    torch.testing.assert_close(got_d, d, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(got_m, m, rtol=0, atol=0)


@pytest.fixture(scope="module")
def vocab_model(tokenizer):
    # hidden 64: oneDNN's bf16 product over only 32 inputs and a 49k-row head is not batch-invariant
    # (a row's result depends on its place in the batch); real models have 288 inputs or more.
    return with_eos(tiny_lm(seed=1, vocab_size=len(tokenizer), tokenizer=tokenizer, hidden=64), ())


def in_format(loaded, format: str):
    """A copy of `loaded` whose forward passes run in `format`."""
    model = copy.deepcopy(loaded.model)
    lm.use_format(model, format)
    return type(loaded)(**{**vars(loaded), "model": model})


@pytest.mark.parametrize("format", QUANTIZED)
def test_a_tokens_logits_do_not_depend_on_what_else_the_pass_scores(vocab_model, format):
    model = in_format(vocab_model, format).model
    ids = torch.randint(0, 1000, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    other = torch.randint(0, 1000, (30,), generator=torch.Generator().manual_seed(3)).tolist()

    def scored(chunk: int, beside: bool) -> torch.Tensor:
        cache, neighbour = lm.SequenceCache(), lm.SequenceCache()
        lm.forward(model, [cache], [ids[:40]], logits_for_last=1)
        lm.forward(model, [neighbour], [other], logits_for_last=1)
        rows = []
        for start in range(40, 60, chunk):
            if beside:  # another session's 3-token verify in the same pass
                out = lm.forward(model, [neighbour, cache], [other[:3], ids[start : start + chunk]])[1]
                neighbour.truncate(30)
            else:
                out = lm.forward(model, [cache], [ids[start : start + chunk]])[0]
            rows.append(out)
        return torch.cat(rows)

    single = scored(1, beside=False)
    assert torch.equal(single, scored(5, beside=False))
    assert torch.equal(single, scored(4, beside=True))


@pytest.mark.parametrize("format", QUANTIZED)
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_speculation_equals_target_only_in_every_format(vocab_model, tiny_draft, format, k):
    target = in_format(vocab_model, format)
    request = GenerationRequest(prompt="Formats and their bits", max_new_tokens=24, num_speculative_tokens=0)
    baseline = joined(run_generation(in_process_engine(target), request))
    for draft in (ModelDrafter(target), ModelDrafter(in_format(with_eos(tiny_draft, ()), format))):
        speculative = run_generation(in_process_engine(target, draft), GenerationRequest(**{**vars(request), "num_speculative_tokens": k}))
        assert joined(speculative) == baseline
    assert lm.weight_format(target.model) == format


def timings(bf16_fast: bool):
    """Forward seconds by format and tokens: a CPU with AMX (flat, fast bf16) or without (slow bf16)."""
    table = {
        "float32": lambda n: 0.060 * (1 + 0.25 * (n - 1)),
        "bfloat16": (lambda n: 0.030 * (1 + 0.03 * (n - 1))) if bf16_fast else (lambda n: 0.600 * n),
        "int8": lambda n: 0.040 * (1 + 0.4 * (n - 1)),
        "int4": lambda n: 0.045 * (1 + 0.5 * (n - 1)),
    }
    return lambda format, n: table[format](n)


def test_auto_picks_flat_bf16_on_a_cpu_with_amx_and_another_format_without():
    with_amx = weights.choose_format(("float32", "bfloat16", "int8", "int4"), timings(bf16_fast=True))
    assert with_amx.format == "bfloat16" and "bfloat16" in with_amx.reason
    without = weights.choose_format(("float32", "bfloat16", "int8", "int4"), timings(bf16_fast=False))
    assert without.format == "int8"
    assert without.seconds_per_token["bfloat16"] > 10 * without.seconds_per_token["int8"]


def test_auto_on_a_real_model_keeps_a_format_and_reports_why(vocab_model):
    loaded = with_eos(in_format(vocab_model, "float32"), ())
    loaded = type(loaded)(**{**vars(loaded), "weight_format": "auto"})
    choice = lm.choose_format(loaded)
    assert set(choice.seconds_per_token) == {"float32", *QUANTIZED} and choice.format in choice.seconds_per_token
    assert lm.weight_format(loaded.model) == choice.format and loaded.placement == f"cpu/{choice.format}"


def test_replicas_that_start_together_time_once_and_agree(vocab_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    timings, noise = [], iter(torch.rand(10_000, generator=torch.Generator().manual_seed(3)).tolist())
    # every timing is noise: two timings at once would each pick a format at random
    monkeypatch.setattr(lm, "forward_seconds", lambda model, tokens, repeats: timings.append(tokens) or next(noise))
    replicas = [type(vocab_model)(**{**vars(in_format(vocab_model, "float32")), "weight_format": "auto"}) for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(len(replicas)) as pool:
        choices = list(pool.map(lm.choose_format, replicas))
    assert len({c.format for c in choices}) == 1 and len(timings) == 4 * len(QUANTIZED + ("float32",))
    assert sum("timed earlier" in c.reason for c in choices) == len(replicas) - 1


def test_quantized_formats_need_the_lean_path():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="Llama"):
        lm.use_format(model, "int4")
    lm.use_format(model, "float32")  # its own: nothing to do
