"""bf16 linears for the CPU (gpt2.cpu.bf16_linear), with and without oneDNN's packed copy (packed_prefill): the layers
swapped, the logits as close to fp32 as torch's own bf16 path gets, and the model usable like any other (generate,
score, copy) or refused clearly.

The bound: packing, and the bf16 kernel decode steps run on, change only the order of the fp32 sums, so the model's
error against fp32 is that of running GPT-2 in bf16 at all. That is measured here on transformers' model cast to
bf16 (torch's own bf16 path), and the packed model may have at most twice its relative RMS logit error.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gpt2
from gpt2.cpu import build, small_batch_matmul
from gpt2.cpu.bf16_linear import PackedLinear, bf16_packing_available, pack_bf16
from tests.checkpoints import engine_twin

pytestmark = pytest.mark.skipif(not bf16_packing_available(), reason="no native bf16 in oneDNN on this CPU")


def rel_rms(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.float() - exact).norm() / exact.norm()).item()


@pytest.fixture(scope="module")
def packed(reference_model):
    return pack_bf16(engine_twin(reference_model).to(torch.bfloat16))


@pytest.fixture(scope="module")
def with_packed_copy(reference_model):
    return pack_bf16(engine_twin(reference_model).to(torch.bfloat16), packed_prefill=True)


@pytest.mark.parametrize("packed_prefill", [False, True])
def test_every_linear_and_the_lm_head_are_packed(packed, with_packed_copy, packed_prefill):
    model = with_packed_copy if packed_prefill else packed
    one_copy = not packed_prefill and build.bf16_available()  # oneDNN's copy kept where the bf16 kernel is missing
    for block in model.h:
        for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert isinstance(layer, PackedLinear)
            assert layer.packed is None if one_copy else layer.packed.layout == torch._mkldnn
    assert isinstance(model.lm_head, PackedLinear)
    assert packed.wte.weight.dtype == torch.bfloat16 and packed.wte.weight.layout == torch.strided  # the lookup
    assert packed.lm_head.plain_weight.data_ptr() == packed.wte.weight.data_ptr()  # shared, not a third copy


@pytest.mark.parametrize("packed_prefill", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 64), (5, 8, 64)])  # 1 and 15 rows: a decode's; 40: oneDNN's
def test_packed_layer_matches_a_plain_bf16_matmul(shape, packed_prefill):
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 64), torch.randn(48)
    layer = PackedLinear(weight, bias, packed_prefill)
    assert torch.equal(layer.dense_weight(), weight.bfloat16())
    x = torch.randn(*shape).bfloat16()
    with torch.inference_mode():
        if small_batch_matmul.applies_bf16(x, layer.plain_weight, layer.bias):  # <= 16 rows, avx512_bf16
            assert torch.equal(layer(x), small_batch_matmul.matmul_bf16(x, layer.plain_weight, layer.bias))
        exact = torch.nn.functional.linear(x.float(), weight.bfloat16().float(), bias.bfloat16().float())
        # one bf16 rounding of the fp32-accumulated output: relative 2^-8
        torch.testing.assert_close(layer(x).float(), exact, rtol=2**-8, atol=1e-3)
        gelu = torch.nn.functional.gelu(exact, approximate="tanh")
        torch.testing.assert_close(layer.forward_gelu(x).float(), gelu, rtol=2**-8, atol=1e-3)


@pytest.mark.parametrize("packed_prefill", [False, True])
def test_logit_error_is_within_twice_torch_bf16(reference_model, packed, with_packed_copy, token_ids, packed_prefill):
    with torch.inference_mode():
        exact = reference_model(token_ids).logits
        torch_bf16 = copy.deepcopy(reference_model).to(torch.bfloat16)(token_ids).logits
        ours = (with_packed_copy if packed_prefill else packed)(token_ids)
    assert ours.dtype == torch.bfloat16
    assert rel_rms(ours, exact) <= 2 * rel_rms(torch_bf16, exact)
    assert (ours.argmax(-1) == exact.argmax(-1)).float().mean().item() > 0.9


def test_decode_steps_are_within_twice_torch_bf16(reference_model, packed, token_ids):
    """Decode steps of 2 rows, whose matmuls run on this engine's bf16 kernel where the CPU has avx512_bf16 (oneDNN
    elsewhere), held to the full forward's bound: measured on the DialoGPT shapes, 1.05% / 1.30% relative RMS against
    fp32, where oneDNN's packed layout gets 1.06% / 1.30%."""
    prompt_len = 4
    with torch.inference_mode():
        exact = reference_model(token_ids).logits[:, prompt_len - 1:]  # (2, T - 3, V)
        torch_bf16 = copy.deepcopy(reference_model).to(torch.bfloat16)(token_ids).logits[:, prompt_len - 1:]
        cache = packed.new_cache(2, token_ids.shape[1])
        steps = [packed(token_ids[:, :prompt_len], cache=cache)[:, -1:]]
        steps += [packed(token_ids[:, t:t + 1], cache=cache) for t in range(prompt_len, token_ids.shape[1])]
    ours = torch.cat(steps, dim=1)
    assert rel_rms(ours, exact) <= 2 * rel_rms(torch_bf16, exact)


def test_cached_decode_matches_a_full_forward(packed, token_ids):
    ids = token_ids[:1]  # (1, T)
    T = ids.shape[1]
    with torch.inference_mode():
        full = packed(ids)[0, -1].float()
        cache = packed.new_cache(1, T)
        packed(ids[:, :-1], cache=cache)
        step = packed(ids[:, -1:], cache=cache)[0, -1].float()
    # the same bf16 model along two summation orders: a few bf16 roundings of the logits apart
    assert rel_rms(step, full) < 0.02


def test_packed_model_generates_and_scores(packed):
    out = packed.generate([[1, 2, 3], [4, 5]], max_new_tokens=4, eos_token_id=None)
    assert [len(row) for row in out] == [4, 4]
    scores = packed.score([[1, 2, 3]], [[4, 5]])
    assert len(scores) == 1 and scores[0] < 0


def test_deepcopy_repacks_and_casting_is_refused(packed):
    twin = copy.deepcopy(packed)
    assert torch.equal(twin.h[0].mlp.c_fc.dense_weight(), packed.h[0].mlp.c_fc.dense_weight())
    assert twin.h[0].mlp.c_fc.dense_weight().data_ptr() != packed.h[0].mlp.c_fc.dense_weight().data_ptr()
    assert twin.lm_head.dense_weight().data_ptr() != packed.wte.weight.data_ptr()  # not the original's wte
    twin.to("cpu", torch.bfloat16)  # what it is already: allowed
    with pytest.raises(ValueError, match="CPU-only bf16 weights, which stay on the CPU in torch.bfloat16"):
        twin.to(torch.float32)


def test_pack_refuses_what_it_cannot_pack(reference_model):
    with pytest.raises(ValueError, match="needs a bf16 model on the CPU"):
        pack_bf16(engine_twin(reference_model))


def test_load_bf16_packs_and_fp32_does_not(checkpoints):
    model = gpt2.load(checkpoints["hf-safetensors"], dtype=torch.bfloat16)
    assert isinstance(model.h[0].attn.c_attn, PackedLinear) and isinstance(model.lm_head, PackedLinear)
    model = gpt2.load(checkpoints["hf-safetensors"])
    assert isinstance(model.h[0].attn.c_attn, torch.nn.Linear) and model.lm_head is None
