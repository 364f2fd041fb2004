"""Int8 weight-only quantization (gpt2.quantize): layers replaced, logits close to fp32 within a derived bound.

The bound. Per-output-channel symmetric int8 rounds each weight to a step s = max|w_row| / 127, an error
uniform in +-s/2, so RMS s/sqrt(12). For a Gaussian row of K = 64..3072 weights max|w| is about 3-4 sigma,
giving a relative weight error of at most 4 / (127 * sqrt(12)) ~= 0.9%, which a matmul passes on as about
0.9% relative RMS error of its output; the bf16 rounding of its input and output adds ~0.1% each. Errors
of successive quantized matmuls add at most in quadrature along the residual stream: the tiny model's
logits go through 4 * 2 + 1 = 9 of them, so sqrt(9) * 1% = 3% relative RMS error. Measured: about 0.8%.
"""

from __future__ import annotations

import copy

import pytest
import torch

from gpt2.quantize import Int8Linear, quantize_int8
from tests.checkpoints import engine_twin

REL_RMS_BOUND = 0.03


@pytest.fixture(scope="module")
def models(reference_model):
    model = engine_twin(reference_model)
    return model, quantize_int8(copy.deepcopy(model))


def test_every_linear_and_the_lm_head_are_int8(models):
    _, quantized = models
    for block in quantized.h:
        for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert isinstance(layer, Int8Linear) and layer.weight.dtype == torch.int8
    assert isinstance(quantized.lm_head, Int8Linear)
    assert quantized.wte.weight.dtype == torch.float32  # the lookup stays exact


def test_logit_error_is_bounded(models, token_ids):
    model, quantized = models
    with torch.inference_mode():
        exact, approx = model(token_ids), quantized(token_ids)
    rel_rms = ((approx - exact).norm() / exact.norm()).item()
    assert rel_rms < REL_RMS_BOUND
    assert (approx.argmax(-1) == exact.argmax(-1)).float().mean().item() > 0.9


def test_quantized_layer_matches_its_dequantized_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = Int8Linear(linear.weight, linear.bias)
    dequantized = q.weight.float() * q.scales.float()[:, None]  # (out, in)
    assert (dequantized - linear.weight).abs().max() <= q.scales.float().max() / 2 + 1e-6  # half a step
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        ref = torch.nn.functional.linear(x.bfloat16().float(), dequantized, linear.bias)
        assert torch.allclose(q(x), ref, rtol=1e-2, atol=1e-2)  # bf16 output rounding only


def test_quantized_model_generates(models):
    _, quantized = models
    out = quantized.generate([[1, 2, 3], [4, 5]], max_new_tokens=4, eos_token_id=None)
    assert [len(row) for row in out] == [4, 4]


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
