"""Int8 quantization (gpt2.cpu.int8_linear): layers replaced, each layer within its rounding bound, logits close to fp32.

The model bound. Per-output-channel symmetric int8 rounds each weight to a step s = max|w_row| / 127, an error
uniform in +-s/2, so RMS s/sqrt(12). For a Gaussian row of K = 64..3072 weights max|w| is about 3-4 sigma,
giving a relative weight error of at most 4 / (127 * sqrt(12)) ~= 0.9%. The input is quantized per call to
uint8 over [min, max], a range of about 8 sigma for LayerNorm outputs: a step of 8/255 sigma, relative RMS
error 8 / (255 * sqrt(12)) ~= 0.9% (twice that with 7-bit activations, on CPUs without VNNI). Together about
1.3% per matmul (2% with 7 bits). Errors of successive quantized matmuls add at most in quadrature along the
residual stream: the tiny model's logits go through 4 * 2 + 1 = 9 of them, so sqrt(9) * 2% = 6% relative
RMS error at most. Measured: 1.1% here, 3.2% on DialoGPT-small's 49.
"""

from __future__ import annotations

import copy

import pytest
import torch

from gpt2.cpu import build
from gpt2.cpu.int8_linear import Int8Linear, quantize_int8
from tests.checkpoints import engine_twin

REL_RMS_BOUND = 0.06


@pytest.fixture(scope="module")
def models(reference_model):
    model = engine_twin(reference_model)
    return model, quantize_int8(copy.deepcopy(model))


@pytest.fixture(scope="module")
def packed_model(models):
    """The int8 model with fbgemm's packed copy beside the plain weights (`packed_prefill`): its forward is fbgemm's."""
    return quantize_int8(copy.deepcopy(models[0]), packed_prefill=True)


def test_every_linear_and_the_lm_head_are_int8(models):
    _, quantized = models
    for block in quantized.h:
        for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert isinstance(layer, Int8Linear) and layer.int8_weight()[0].dtype == torch.int8
    assert isinstance(quantized.lm_head, Int8Linear)
    assert quantized.wte.weight.dtype == torch.float32  # the lookup stays exact


@pytest.mark.parametrize("packed", [False, True])
def test_logit_error_is_bounded(models, packed_model, token_ids, packed):
    model, quantized = models
    with torch.inference_mode():
        exact, approx = model(token_ids), (packed_model if packed else quantized)(token_ids)
    rel_rms = ((approx - exact).norm() / exact.norm()).item()
    assert rel_rms < REL_RMS_BOUND
    assert (approx.argmax(-1) == exact.argmax(-1)).float().mean().item() > 0.9


@pytest.mark.parametrize("packed_prefill", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 64), (3, 7, 64)])  # 1 and 15 rows: the C kernel's; 21: _int_mm's
def test_quantized_layer_is_within_its_rounding_bounds(shape, packed_prefill):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = Int8Linear(linear.weight, linear.bias, packed_prefill)
    weight, scales = q.int8_weight()
    dequantized = weight.float() * scales[:, None]  # (out, in)
    assert (dequantized - linear.weight).abs().max() <= scales.max() / 2 + 1e-6  # half a weight step
    x = torch.randn(shape)
    with torch.inference_mode():
        exact = torch.nn.functional.linear(x, dequantized, linear.bias)
        y = q(x)
    # x is quantized to 255 (7-bit, fbgemm without VNNI: 127) steps over [min(x, 0), max(x, 0)] of the whole call
    # (fbgemm) or of each row (the plain weight's path: a range no wider): each input off by at most half a step, so
    # output o is off by at most step / 2 * sum_k |W[o, k]| (plus fp32 summation-order noise).
    levels = 127 if q.packed is not None and q.reduce_range else 255
    step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / levels
    bound = step / 2 * dequantized.abs().sum(dim=1) + 1e-4  # (out,)
    assert y.shape == (*shape[:-1], 48)
    assert ((y - exact).abs() <= bound).all()
    assert (y - exact).abs().max() > 0  # it does quantize the input


def test_quantized_model_generates(models):
    _, quantized = models
    out = quantized.generate([[1, 2, 3], [4, 5]], max_new_tokens=4, eos_token_id=None)
    assert [len(row) for row in out] == [4, 4]


def test_quantized_model_copies_and_refuses_casts(models, token_ids):
    _, quantized = models
    twin = copy.deepcopy(quantized).to("cpu", torch.float32)  # what it is already: allowed
    with torch.inference_mode():
        assert torch.equal(twin(token_ids), quantized(token_ids))
    with pytest.raises(ValueError, match="CPU-only int8 weights, which stay on the CPU in torch.float32"):
        twin.half()


def test_an_engine_that_cannot_pack_is_reported(monkeypatch):
    def cannot_pack(*args):
        raise RuntimeError("per-channel quantization is not supported\nat some frame")

    monkeypatch.setattr(torch.ops.quantized, "linear_prepack", cannot_pack)
    with pytest.raises(ValueError, match="cannot pack per-channel int8 weights .per-channel quantization is not sup"):
        Int8Linear(torch.randn(8, 4), None, packed_prefill=True)


def test_refuses_a_bf16_model(reference_model):
    model = engine_twin(reference_model).to(torch.bfloat16)
    with pytest.raises(ValueError, match="fp32 model on the CPU"):
        quantize_int8(model)


def test_load_with_quantize_int8(checkpoints):
    import gpt2

    model = gpt2.load(checkpoints["hf-safetensors"], quantize="int8")
    assert isinstance(model.h[0].mlp.c_fc, Int8Linear) and isinstance(model.lm_head, Int8Linear)
    with pytest.raises(ValueError, match="quantize='int4' is not supported"):
        gpt2.load(checkpoints["hf-safetensors"], quantize="int4")
    with pytest.raises(ValueError, match="needs an fp32 model"):
        gpt2.load(checkpoints["hf-safetensors"], dtype=torch.bfloat16, quantize="int8")


@pytest.mark.skipif(not build.int8_available(), reason="no avx512_vnni on this CPU")
@pytest.mark.parametrize("n_rows", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("out_features, in_features", [(33, 64), (17, 192), (260, 128)])
@pytest.mark.parametrize("gelu", [False, True])
def test_the_c_step_matmul_is_fbgemms_row_by_row(n_rows, out_features, in_features, gelu):
    """The int8 decode step's matmul (csrc/small_batch_matmul_int8.c) quantizes each input row as fbgemm quantizes a
    whole input: each row's output is the layer's own on that row alone, up to fp32 rounding (1e-5 of the largest),
    for row and output counts that leave partial blocks and passes, with an input row of one sign and one of zeros."""
    generator = torch.Generator().manual_seed(n_rows)
    layer = Int8Linear(torch.randn(out_features, in_features, generator=generator) / 8,
                       torch.randn(out_features, generator=generator), packed_prefill=True)  # forward: fbgemm
    x = torch.randn(n_rows, in_features, generator=generator) * 3
    x[0] = x[0].abs()  # no negative value: the zero point at 0
    if n_rows > 1:
        x[1] = 0.0  # a zero range: fbgemm's fallback scale
    y = torch.empty(n_rows, out_features)
    status = build.library().small_batch_matmul_int8(layer.step_weight.data_ptr(), layer.step_rows.data_ptr(),
                                                           x.data_ptr(), y.data_ptr(), n_rows, out_features,
                                                           in_features, gelu)
    expected = torch.cat([layer(x[j:j + 1]) for j in range(n_rows)])
    if gelu:
        expected = torch.nn.functional.gelu(expected, approximate="tanh")
    assert status == 0
    assert (y - expected).abs().max() <= 1e-5 * expected.abs().max()
