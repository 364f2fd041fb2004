"""Tests of the fused decode kernels against their torch references: kernels/ln_linear.py, qkv_append.py,
attention_residual.py, linear_residual.py, embedding.py (and the grid plan of kernels/_matvec.py).

Without CUDA they run under the Triton interpreter on small, odd shapes: batches of 1 (the multiply-and-reduce
matvec), 3 and 17 (tl.dot over rows padded to 16, and a second row block), K not a multiple of the tile, K split
into several atomic partial sums, attention over 300 keys in several splits with ragged lengths, caches as strided
views. On a GPU the same tests run natively (tensor-core dots, compiled atomics); timings at DialoGPT shapes are in
benchmarks/bench_kernels.py (`--fused`).

Tolerances: fp32 results are compared with the reference evaluated in float64 (atol 2e-5, rtol 1e-5: fp32
accumulation over up to 1000 products of O(1) values); fp16/bf16 results must satisfy
max|ours - ref| <= 2 * max|torch_lowp - ref| + eps, the rule of tests/kernel_tolerances.py, where torch_lowp is the
reference run in the low-precision dtype (its matmul output rounded to that dtype, where the kernels keep fp32). The
fp32 residual that linear_residual updates is held to the fp32 tolerance in every dtype (see the test); the one
attention_residual updates follows the low-precision rule, since attention's output is rounded before its projection.
"""

from functools import partial

import pytest
import torch

from gpt2_kernels import qkv_append
from gpt2_kernels._matvec import matvec_plan
from gpt2_kernels.attention_residual import attention_residual, attention_residual_reference
from gpt2_kernels.embedding import embedding, embedding_reference
from gpt2_kernels.linear_residual import linear_residual, linear_residual_reference
from gpt2_kernels.ln_linear import ln_linear, ln_linear_reference
from tests.kernel_tolerances import DEVICE, DTYPES, assert_matches

_assert_matches = partial(assert_matches, atol=2e-5, rtol=1e-5)


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=gen)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, N, K, gelu, has_bias", [
    (1, 70, 100, False, True), (1, 200, 48, True, True), (3, 70, 100, True, True), (17, 33, 80, False, False)])
def test_ln_linear(B: int, N: int, K: int, gelu: bool, has_bias: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(B * 1000 + N)
    x = _randn(gen, B, K, scale=3.0) + 1.0  # the fp32 residual stream, off zero
    ln_w, ln_b = _randn(gen, K, dtype=dtype), _randn(gen, K, dtype=dtype)
    weight = _randn(gen, N, K, scale=K ** -0.5, dtype=dtype)
    bias = _randn(gen, N, dtype=dtype) if has_bias else None
    args = (x, ln_w, ln_b, weight, bias, 1e-5)
    ref64 = ln_linear_reference(*(None if t is None else t.double() for t in args[:5]), 1e-5, gelu)
    _assert_matches(ln_linear(*args, gelu), ref64, ln_linear_reference(*args, gelu), f"ln_linear B={B} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, sms", [(1, 132), (3, 132), (3, 1)])
def test_ln_qkv_append(B: int, sms: int, dtype: torch.dtype, monkeypatch) -> None:
    """q matches; each row's key and value land at its own slot, every other slot of the caches is untouched. With
    one SM the plan takes 64-column tiles, which straddle the query/key/value boundaries (C = 48)."""
    monkeypatch.setattr(qkv_append, "sm_count", lambda device: sms)
    gen = torch.Generator().manual_seed(B)
    H, D, S = 3, 16, 40
    C = H * D
    x = _randn(gen, B, C, scale=2.0)
    ln_w, ln_b = _randn(gen, C, dtype=dtype), _randn(gen, C, dtype=dtype)
    weight, bias = _randn(gen, 3 * C, C, scale=C ** -0.5, dtype=dtype), _randn(gen, 3 * C, dtype=dtype)
    slots = torch.tensor([5, 0, S - 1][:B], dtype=torch.int32, device=DEVICE)
    buffer = _randn(gen, 2, B, H, S + 3, D, dtype=dtype)  # the caches are strided views of a longer buffer

    def run(fn, *params):
        caches = buffer.clone()
        k, v = caches[0, :, :, :S], caches[1, :, :, :S]
        return fn(*params, k, v, slots, 1e-5), caches

    q, caches = run(qkv_append.ln_qkv_append, x, ln_w, ln_b, weight, bias)
    q_lowp, caches_lowp = run(qkv_append.ln_qkv_append_reference, x, ln_w, ln_b, weight, bias)
    wide = (t.double() for t in (x, ln_w, ln_b, weight, bias))
    q64, caches64 = (t.double() for t in run(qkv_append.ln_qkv_append_reference, *wide))
    _assert_matches(q, q64, q_lowp, f"q B={B} {dtype}")
    _assert_matches(caches, caches64, caches_lowp, f"caches B={B} {dtype}")
    written = torch.zeros(B, S + 3, dtype=torch.bool, device=DEVICE)
    written[torch.arange(B), slots.long()] = True
    untouched = ~written[None, :, None, :, None].expand_as(buffer)  # (2, B, H, S + 3, D)
    assert torch.equal(caches[untouched], buffer[untouched])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, N, K, has_bias", [(1, 70, 1000, True), (3, 48, 300, True), (17, 40, 90, False)])
def test_linear_residual(B: int, N: int, K: int, has_bias: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(K + B)
    x = _randn(gen, B, K, dtype=dtype)
    weight = _randn(gen, N, K, scale=K ** -0.5, dtype=dtype)
    bias = _randn(gen, N, dtype=dtype) if has_bias else None
    residual = _randn(gen, B, N, scale=4.0)
    ref64 = linear_residual_reference(x.double(), weight.double(), None if bias is None else bias.double(),
                                      residual.double())
    lowp = linear_residual_reference(x, weight, bias, residual.clone())
    ours = linear_residual(x, weight, bias, residual.clone())
    # fp32 tolerances in every dtype: the products of fp16/bf16 inputs are exact in fp32, and the kernel never
    # rounds the sum to the low precision (the reference does, so it is not the yardstick here).
    _assert_matches(ours, ref64, lowp, f"linear_residual B={B} K={K} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, H, D, kv_len", [(1, 3, 16, [300]), (3, 2, 32, [300, 1, 157])])
def test_attention_residual(B: int, H: int, D: int, kv_len: list[int], dtype: torch.dtype) -> None:
    """300 keys in several splits, merged in the out-projection's prologue; q strided as the model's is."""
    gen = torch.Generator().manual_seed(B * H * D)
    S, C = 300, H * D
    q = _randn(gen, B, 3 * C, dtype=dtype)[:, C:2 * C].view(B, H, D)  # not contiguous
    k, v = _randn(gen, B, H, S, D, dtype=dtype), _randn(gen, B, H, S, D, dtype=dtype)
    lengths = torch.tensor(kv_len, dtype=torch.int32, device=DEVICE)
    weight, bias = _randn(gen, C, C, scale=C ** -0.5, dtype=dtype), _randn(gen, C, dtype=dtype)
    residual = _randn(gen, B, C, scale=4.0)
    scale = D ** -0.5
    ref64 = attention_residual_reference(q.double(), k.double(), v.double(), lengths, scale, weight.double(),
                                         bias.double(), residual.double())
    lowp = attention_residual_reference(q, k, v, lengths, scale, weight, bias, residual.clone())
    ours = attention_residual(q, k, v, lengths, scale, weight, bias, residual.clone())
    _assert_matches(ours, ref64, lowp, f"attention_residual B={B} D={D} {dtype}", computed_in=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding(dtype: torch.dtype) -> None:
    """Exact: a sum of two values widened to fp32."""
    gen = torch.Generator().manual_seed(2)
    wte, wpe = _randn(gen, 50, 300, dtype=dtype), _randn(gen, 20, 300, dtype=dtype)
    tokens = torch.tensor([3, 49, 0], device=DEVICE)
    positions = torch.tensor([19, 0, 7], dtype=torch.int32, device=DEVICE)
    assert torch.equal(embedding(tokens, positions, wte, wpe), embedding_reference(tokens, positions, wte, wpe))


@pytest.mark.parametrize("C", [768, 1024, 1280])
def test_plans_fill_an_h100_at_batch_1(C: int) -> None:
    """Every matvec of a DialoGPT decode step starts at least one program per SM (132) at batch 1: the wide ones by
    their columns, c_proj (C x C and C x 4C) by splitting K too."""
    shapes = {"qkv": (3 * C, C, False), "c_fc": (4 * C, C, False), "attn c_proj": (C, C, True),
              "mlp c_proj": (C, 4 * C, True), "lm_head": (50257, C, False)}
    for name, (N, K, may_split_k) in shapes.items():
        plan = matvec_plan(1, N, K, 132, may_split_k)
        programs = plan.grid(1, N)
        assert programs[0] * programs[1] * programs[2] >= 132, name
        assert plan.split_k * plan.k_per_split >= K > (plan.split_k - 1) * plan.k_per_split, name
