"""The CPU fp32 attention kernel (gpt2/attention.py, gpt2/cpu/csrc/attention_f32.c) against torch's SDPA with the
model's masks (`TorchBackend.attention`'s other path): prefill chunks, ragged rows, chunks continuing a cache, single
queries, rows adding nothing, and where it applies. Tolerance: 2e-6 absolute on outputs of values ~N(0, 1) (both
fp32, different summation order and exp; measured up to 1.6e-6 at 128 keys)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2.cpu import attention, build
from gpt2.kv_cache import ForwardStep

pytestmark = pytest.mark.skipif(build.unavailable_reason() is not None,
                                reason=f"C kernels unavailable: {build.unavailable_reason()}")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: ForwardStep) -> torch.Tensor:
    mask = step.attention_mask
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def inputs(B: int, H: int, T: int, D: int, step: ForwardStep, seed: int) -> tuple[torch.Tensor, ...]:
    """q as the model has it (a strided view of a (B, T, 3, H, D) qkv output), k and v views of a longer cache."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, 3, H, D, generator=g).permute(2, 0, 3, 1, 4)[0]  # (B, H, T, D)
    cache = torch.randn(2, B, H, step.kv_span + 7, D, generator=g)
    return q, cache[0, :, :, :step.kv_span], cache[1, :, :, :step.kv_span]


CASES = {  # name: (B, H, head_dim, q_start, n_new, chunk_len)
    "prefill": (8, 12, 64, [0] * 8, [32] * 8, 32),
    "ragged prefill": (3, 4, 48, [0, 0, 0], [17, 5, 1], 17),
    "continuing a cache": (2, 2, 16, [9, 40], [20, 3], 20),
    "a row adding nothing": (3, 2, 32, [4, 0, 11], [6, 0, 6], 6),
    "decode": (5, 3, 64, [7, 0, 30, 31, 100], [1, 1, 1, 0, 1], 1),
    "a long prompt": (1, 2, 64, [0], [300], 300),
    "MAX_AVERAGE_KEYS keys a query": (1, 2, 80, [attention.MAX_AVERAGE_KEYS - 16], [32], 32),
    "decode over a long cache": (2, 2, 64, [1000, 500], [1, 1], 1),
}


@pytest.mark.parametrize("name", CASES)
@torch.inference_mode()
def test_matches_sdpa(name):
    B, H, D, q_start, n_new, T = CASES[name]
    step = ForwardStep.build(q_start, n_new, T, 2048, torch.device("cpu"))
    q, k, v = inputs(B, H, T, D, step, seed=len(name))
    assert attention.applies(q, k, v, step)
    got = attention.attention(q, k, v, step)
    expected = sdpa(q, k, v, step)
    assert got.shape == expected.shape == (B, H, T, D)
    valid = torch.arange(T)[None, :] < torch.tensor(n_new)[:, None]  # (B, T): padding queries are never used
    diff = (got - expected).abs().amax(dim=(1, 3))  # (B, T)
    assert diff[valid].max().item() <= 2e-6
    assert got.transpose(1, 2).is_contiguous()  # (B, T, H, D): the output projection's input, without a copy


@torch.inference_mode()
def test_a_query_with_no_key_gets_zeros():
    """A row holding nothing and adding nothing (SDPA gives NaN there)."""
    step = ForwardStep.build([0, 0], [3, 0], 3, 64, torch.device("cpu"))
    q, k, v = inputs(2, 2, 3, 16, step, seed=0)
    got = attention.attention(q, k, v, step)
    assert torch.isfinite(got).all() and (got[1] == 0).all()


@torch.inference_mode()
def test_keys_past_each_rows_length_are_never_used():
    """Slots a row has not written (past kv_len) hold anything, NaN included: the kernel reads them, masked."""
    step = ForwardStep.build([0, 0], [5, 2], 5, 64, torch.device("cpu"))
    q, k, v = inputs(2, 2, 5, 16, step, seed=1)
    expected = attention.attention(q, k, v, step)
    k, v = k.clone(), v.clone()
    k[1, :, 2:], v[1, :, 2:] = float("nan"), float("nan")
    got = attention.attention(q, k, v, step)
    assert torch.equal(got[:, :, :2], expected[:, :, :2]) and torch.equal(got[0], expected[0])


def test_applies_only_to_what_it_can_take():
    step = ForwardStep.build([0], [8], 8, 1024, torch.device("cpu"))
    q, k, v = inputs(1, 2, 8, 16, step, seed=2)
    # 32 queries after a cache of 241: they read 257 keys on average
    long_chunk = ForwardStep.build([attention.MAX_AVERAGE_KEYS - 15], [32], 32, 1024, torch.device("cpu"))
    lq, lk, lv = inputs(1, 2, 32, 16, long_chunk, seed=3)
    with torch.inference_mode():
        assert attention.applies(q, k, v, step)
        assert not attention.applies(lq, lk, lv, long_chunk)  # SDPA's blocked matmuls are faster there
        assert not attention.applies(q.double(), k.double(), v.double(), step)
        assert not attention.applies(q.bfloat16(), k.bfloat16(), v.bfloat16(), step)
        assert not attention.applies(q[..., :8], k[..., :8], v[..., :8], step)  # head_dim % 16 != 0
        assert not attention.applies(q, k, v.contiguous(), step)  # keys and values in other layouts
        assert not attention.applies(q, k[:, :, :4], v[:, :, :4], step)  # fewer key slots than the step reads
    assert not attention.applies(q.requires_grad_(), k, v, step)  # autograd keeps SDPA
