"""The native forward pass (specdec/native): its products against a slow float64 reference of the
same block arithmetic, in the vector build and the portable one; Q4_1 nibbles that hold GGUF's
own weights; the whole forward pass against transformers' and the lean path's; feature layers;
caches that grow. Batch invariance, greedy speculation and the sampled distribution in q4_1 and
q8_0 are in test_weights.py and test_speculation.py with the other formats."""

from __future__ import annotations

import copy
import ctypes
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from harness.tiny import tiny_lm
from specdec import lm, native
from specdec.native import model as native_model

pytestmark = pytest.mark.skipif(not native.available()[0], reason=f"native forward pass: {native.available()[1]}")


def reference_product(matrix: native_model.QuantizedMatrix, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, slowly and in float64: activations quantized per 32 values to
    int8 (scale max|x| / 127, round half to even), times the dequantized weights."""
    blocks = x.double().view(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(scale > 0, scale, torch.ones_like(scale)))
    return (q * scale).flatten(1) @ matrix.dequantized().double().T


@pytest.mark.parametrize("format", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 17])
def test_a_product_equals_the_slow_reference(format, rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(40, 96, generator=generator) * 0.05
    x = torch.randn(rows, 96, generator=generator)
    x[0, :32] = 0  # an all-zero block has scale 0
    matrix = native_model.QuantizedMatrix(weight, format)
    got = matrix(x)
    assert got.shape == (rows, 40)
    torch.testing.assert_close(got.double(), reference_product(matrix, x), rtol=1e-5, atol=1e-5)
    # and the blocks hold the weights to within half a step
    step = 2 * weight.abs().max() / 127 if format == "q8_0" else (weight.max() - weight.min()) / 15
    assert (matrix.dequantized() - weight).abs().max() <= step / 2 + 1e-6


def test_q4_1_nibbles_hold_ggufs_own_weights():
    """Weights dequantized from Q4_1 (w = d * q + m) come back as the same q, d and m, with element
    i of a block in byte i's low nibble and element i + 16 in its high one."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (4, 64), generator=generator)
    q[:, ::32], q[:, 1::32] = 0, 15
    d, m = torch.rand(4, 2, generator=generator) * 0.01 + 1e-3, -torch.rand(4, 2, generator=generator) * 0.1
    weight = d.repeat_interleave(32, 1) * q + m.repeat_interleave(32, 1)
    nibbles, got_d, got_m = native_model.q4_1_blocks(weight)
    assert nibbles.shape == (4, 2, 16) and nibbles.dtype == torch.uint8
    blocks = q.view(4, 2, 32)
    assert torch.equal(nibbles & 15, blocks[..., :16].to(torch.uint8))
    assert torch.equal(nibbles >> 4, blocks[..., 16:].to(torch.uint8))
    torch.testing.assert_close(got_m, m, rtol=0, atol=0)
    torch.testing.assert_close(got_d, d, rtol=1e-5, atol=1e-8)


def test_the_portable_build_computes_what_the_vector_build_does(tmp_path):
    """The C fallback for processors without AVX2 (compiled here without -march=native) gives the
    vector build's products to float rounding."""
    library = tmp_path / "portable.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-pthread", "-mno-avx2", "-o", str(library), *map(str, native.SOURCES), "-lm"], check=True)
    portable = ctypes.CDLL(str(library))
    portable.specdec_native_isa.restype = ctypes.c_char_p
    assert portable.specdec_native_isa() == b"portable"
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 64, generator=generator)
    for format in ("q4_1", "q8_0"):
        matrix = native_model.QuantizedMatrix(torch.randn(24, 64, generator=generator) * 0.1, format)
        y = torch.empty(6, 24)
        assert portable.specdec_gemm(ctypes.byref(matrix.struct), 6, ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr())) == 0
        torch.testing.assert_close(y, matrix(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    return tiny_lm(seed=3, vocab_size=300, hidden=64, init=0.1).model


def logits_of(model, format, prompt, steps):
    """Logits of the prompt's last token and of `steps` further tokens fed one at a time."""
    if format:
        lm.use_format(model, format)
    cache = lm.SequenceCache()
    out = [lm.forward(model, [cache], [prompt], logits_for_last=1)[0]]
    for token in steps:
        out.append(lm.forward(model, [cache], [[token]])[0])
    return torch.cat(out)


def rounded_to_blocks(model, format):
    """A float32 copy of `model` whose weights are what `format`'s blocks hold: the native pass
    over it differs only by the quantization of activations."""
    copy_ = copy.deepcopy(model)
    layer_format, head_format = native_model.PARTS[format]
    with torch.no_grad():
        for name, module in copy_.named_modules():
            if isinstance(module, torch.nn.Linear):
                part = head_format if module is copy_.get_output_embeddings() else layer_format
                module.weight.copy_(native_model.QuantizedMatrix(module.weight, part).dequantized())
    return copy_


@pytest.mark.parametrize("format", ["q4_1", "q8_0"])
def test_the_forward_pass_scores_like_float32_over_the_same_weights(model, format):
    """Against transformers in float32 over the blocks' own weights: only the int8 activations
    differ (about 1 % of the largest logit)."""
    prompt, steps = list(range(5, 45)), [7, 8, 9, 10, 11]
    reference = rounded_to_blocks(model, format)
    exact = logits_of(reference, "float32", prompt, steps)
    got = logits_of(reference, format, prompt, steps)
    assert got.shape == exact.shape
    error = (got - exact).abs().max() / exact.abs().max()
    assert error < 0.03, error
    assert (got.argmax(-1) == exact.argmax(-1)).float().mean() > 0.8


def test_features_are_the_decoder_layers_outputs(model):
    """The layers' outputs the native pass returns equal transformers' hidden states over the same
    weights (to the int8 activations' error), the last one taken before the final norm."""
    reference = rounded_to_blocks(model, "q8_0")
    ids = list(range(10, 30))
    with torch.inference_mode():
        states = reference(torch.tensor([ids]), output_hidden_states=True).hidden_states  # embeddings, layer 1, ..., last normed
    lm.use_format(reference, "q8_0")
    _, features = lm.forward(reference, [lm.SequenceCache()], [ids], features=(0, -1))
    first, last = features[0][:, :64], features[0][:, 64:]
    assert features[0].shape == (20, 128)
    assert (first - states[1][0]).abs().max() < 0.03 * states[1].abs().max()
    normed = torch.nn.functional.rms_norm(last, (64,), reference.model.norm.weight, reference.config.rms_norm_eps)
    assert (normed - states[-1][0]).abs().max() < 0.03 * states[-1].abs().max()


def test_caches_grow_and_roll_back_in_place(model):
    """A sequence longer than its first buffer grows it (all layers alike); a truncated cache
    scores the next tokens as a fresh one does."""
    lm.use_format(model, "q4_1")
    grown, fresh = lm.SequenceCache(), lm.SequenceCache()
    ids = [(11 * i) % 300 for i in range(70)]
    lm.forward(model, [grown], [ids[:3]])
    for token in ids[3:50]:
        lm.forward(model, [grown], [[token]])
    assert grown.length == 50 and len({k.shape[2] for k in grown.keys}) == 1 and grown.keys[0].shape[2] >= 50
    grown.truncate(40)
    lm.forward(model, [fresh], [ids[:20]])  # rows of up to 32 tokens stay native
    lm.forward(model, [fresh], [ids[20:40]])
    again = lm.forward(model, [grown], [ids[40:45]])[0]
    assert torch.equal(again, lm.forward(model, [fresh], [ids[40:45]])[0])
    lm.use_format(model, "float32")


@pytest.mark.parametrize("format", ["q4_1", "q8_0"])
def test_products_split_over_threads_give_the_same_bits(model, format):
    """Each product's outputs split over three threads give one thread's logits bit for bit, for
    ragged rows in one batch; callers on two Python threads at once (one gets the pool, the other
    computes alone) too."""
    lm.use_format(model, format)
    prompts = [[(7 * i + j) % 300 for j in range(n)] for i, n in enumerate((5, 17, 1))]

    def scored():
        return lm.forward(model, [lm.SequenceCache() for _ in prompts], prompts)

    alone = scored()
    try:
        assert native.set_threads(3) == 3
        split = [scored()]
        with ThreadPoolExecutor(2) as callers:
            split += list(callers.map(lambda _: scored(), range(6)))
    finally:
        assert native.set_threads(1) == 1
    assert all(torch.equal(a, b) for run in split for a, b in zip(alone, run))
    lm.use_format(model, "float32")


def test_a_forked_child_computes_without_the_parents_threads(model):
    """fork copies only the calling thread: the child must not wait for workers it does not have."""
    lm.use_format(model, "q4_1")
    prompt = [3, 1, 4, 1, 5]
    alone = lm.forward(model, [lm.SequenceCache()], [prompt])[0]
    try:
        assert native.set_threads(2) == 2
        lm.forward(model, [lm.SequenceCache()], [prompt])  # the workers have run
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through its exit status only
            same = torch.equal(lm.forward(model, [lm.SequenceCache()], [prompt])[0], alone)
            os._exit(0 if same and native.set_threads(2) == 2 else 1)
        deadline = time.monotonic() + 60
        while (status := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if status[0] == 0:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        assert status[0] == child and os.waitstatus_to_exitcode(status[1]) == 0
    finally:
        native.set_threads(1)
        lm.use_format(model, "float32")


def test_native_formats_refuse_what_they_cannot_run():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="Llama"):
        lm.use_format(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), "q4_1")
    odd = tiny_lm(seed=4, vocab_size=50, hidden=48).model  # 48 inputs: not whole blocks of 32
    with pytest.raises(ValueError, match="blocks of 32"):
        lm.use_format(odd, "q8_0")


def test_long_rows_prefill_in_float32_and_share_the_cache(model):
    """A row of more than 32 new tokens (a prompt's prefill) runs the float32 lean path over the
    model's own weights, into the same cache, alone or beside native rows; decoding goes on natively."""
    ids = [(13 * i) % 300 for i in range(60)]
    lm.use_format(model, "float32")
    reference = lm.SequenceCache()
    exact = lm.forward(model, [reference], [ids[:40]])[0]
    lm.use_format(model, "q4_1")
    alone, beside, neighbour = lm.SequenceCache(), lm.SequenceCache(), lm.SequenceCache()
    assert torch.equal(lm.forward(model, [alone], [ids[:40]])[0], exact)
    lm.forward(model, [neighbour], [ids[:5]])
    mixed = lm.forward(model, [neighbour, beside], [ids[5:8], ids[:40]])
    assert torch.equal(mixed[1], exact) and mixed[0].shape == (3, 300)
    assert torch.equal(alone.keys[1][:, :, :40], reference.keys[1][:, :, :40])
    steps = [lm.forward(model, [cache], [ids[40:44]])[0] for cache in (alone, beside)]
    assert torch.equal(steps[0], steps[1])
    lm.use_format(model, "float32")
