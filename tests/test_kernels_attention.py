"""Tests of kernels/attention_prefill.py and kernels/attention_decode.py against their references.

Without CUDA they run under the Triton interpreter on small shapes (H <= 3, T <= 257, S <= 300).
They cover ragged rows, chunks continuing a cache (q_start > 0), padding query rows, K/V given as
non-contiguous slices of a larger cache buffer, non-contiguous q, D in {16, 32, 64, 128}, and for
decode both the single-split path and the split + combine path. On a GPU the same tests run
natively on cuda, which adds tensor-core dots (in bf16 too: the interpreter widens bf16 dot
operands to fp32, see kernels/attention_prefill.py), the compiled exp2 and the capture of a
decode step in a CUDA graph (test_decode_cuda_graph_replay, GPU only); timings at DialoGPT sizes
are in benchmarks/bench_kernels.py.

Tolerances: fp32 results are compared with the reference evaluated in float64 (atol 2e-5: fp32
accumulation over up to 300 keys of O(1) values); fp16/bf16 results must satisfy
max|ours - ref| <= 2 * max|torch_lowp - ref| + eps, the rule of tests/kernel_tolerances.py.
"""

import math
from functools import partial

import pytest
import torch

from gpt2_kernels.attention_decode import _split_plan, attention_decode, attention_decode_reference
from gpt2_kernels.attention_prefill import attention_prefill, attention_prefill_reference
from tests.kernel_tolerances import DEVICE, DTYPES, assert_matches

_assert_matches = partial(assert_matches, atol=2e-5)


def _cache_views(B: int, H: int, S: int, D: int, dtype: torch.dtype, gen: torch.Generator):
    """k, v = cache[0][:, :, :S], cache[1][:, :, :S] of a (2, B, H, S + 5, D) buffer: not contiguous."""
    cache = torch.randn(2, B, H, S + 5, D, generator=gen).to(DEVICE, dtype)
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    assert not k.is_contiguous() and not v.is_contiguous()
    return k, v


def _lengths(values: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=DEVICE)


# (H, T, D, S, q_start, kv_len): B = len(q_start).
PREFILL_CASES = [
    pytest.param(2, 1, 16, 1, [0], [1], id="one-token"),
    pytest.param(2, 7, 64, 12, [0, 3], [7, 10], id="full-and-continued-chunk"),
    pytest.param(2, 33, 32, 40, [0, 0, 5], [33, 20, 38], id="ragged-with-padding-rows"),
    pytest.param(2, 7, 16, 30, [2, 0, 9, 20, 1], [20, 3, 16, 27, 8], id="batch5-keys-past-window"),
    pytest.param(2, 33, 128, 80, [40], [73], id="d128-offset"),
    pytest.param(2, 257, 64, 257, [0], [257], id="t257"),
    pytest.param(2, 257, 64, 300, [0, 40], [250, 297], id="t257-ragged-continued"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,T,D,S,q_start,kv_len", PREFILL_CASES)
def test_prefill_matches_reference(H, T, D, S, q_start, kv_len, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(T * 131 + D)
    B = len(q_start)
    # q as the model produces it: (B, T, H, D) transposed to (B, H, T, D).
    q = torch.randn(B, T, H, D, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    k, v = _cache_views(B, H, S, D, dtype, gen)
    qs, kl, scale = _lengths(q_start, torch.int64), _lengths(kv_len, torch.int64), 1.0 / math.sqrt(D)
    ours = attention_prefill(q, k, v, qs, kl, scale)
    ref64 = attention_prefill_reference(q.double(), k.double(), v.double(), qs, kl, scale)
    lowp = attention_prefill_reference(q, k, v, qs, kl, scale)
    _assert_matches(ours, ref64, lowp, f"prefill B={B} H={H} T={T} D={D} {dtype}")


# (H, D, S, kv_len): B = len(kv_len).
DECODE_CASES = [
    pytest.param(2, 16, 1, [1], id="single-key"),
    pytest.param(2, 32, 40, [40, 1, 17, 33, 8], id="batch5-single-split"),
    pytest.param(2, 64, 300, [300, 1, 129], id="split-combine"),
    pytest.param(2, 64, 300, [5, 64], id="mostly-empty-splits"),
    pytest.param(3, 128, 257, [257, 100], id="d128-split-combine"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,D,S,kv_len", DECODE_CASES)
def test_decode_matches_reference(H, D, S, kv_len, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(S * 7 + D)
    B = len(kv_len)
    # q as a slice of a fused qkv projection: (B, H, 3, D)[:, :, 0] is not contiguous.
    q = torch.randn(B, H, 3, D, generator=gen).to(DEVICE, dtype)[:, :, 0]
    k, v = _cache_views(B, H, S, D, dtype, gen)
    kl, scale = _lengths(kv_len), 1.0 / math.sqrt(D)
    ours = attention_decode(q, k, v, kl, scale)
    ref64 = attention_decode_reference(q.double(), k.double(), v.double(), kl, scale)
    lowp = attention_decode_reference(q, k, v, kl, scale)
    _assert_matches(ours, ref64, lowp, f"decode B={B} H={H} D={D} S={S} {dtype}")


def test_decode_equals_last_prefill_row() -> None:
    """A decode step is the prefill of one token at position kv_len - 1."""
    gen = torch.Generator().manual_seed(5)
    B, H, S, D = 3, 2, 70, 64
    q = torch.randn(B, H, D, generator=gen).to(DEVICE)
    k, v = _cache_views(B, H, S, D, torch.float32, gen)
    kl = _lengths([70, 2, 45])
    dec = attention_decode(q, k, v, kl, 0.125)
    pre = attention_prefill(q.unsqueeze(2), k, v, kl - 1, kl, 0.125)[:, :, 0]
    torch.testing.assert_close(dec, pre, atol=2e-5, rtol=0)


def test_zero_length_rows_give_zeros() -> None:
    """kv_len = 0 is outside the contract, but must not produce NaN: those rows come out as 0."""
    gen = torch.Generator().manual_seed(6)
    B, H, S, D = 2, 2, 100, 16
    k, v = _cache_views(B, H, S, D, torch.float32, gen)
    kl = _lengths([0, 100])
    dec = attention_decode(torch.randn(B, H, D, generator=gen).to(DEVICE), k, v, kl, 0.25)
    pre = attention_prefill(torch.randn(B, H, 5, D, generator=gen).to(DEVICE), k, v, _lengths([0, 95]), kl, 0.25)
    assert (dec[0] == 0).all() and torch.isfinite(dec).all()
    assert (pre[0] == 0).all() and torch.isfinite(pre).all()


@pytest.mark.parametrize(
    "B,H,S", [(1, 12, 1024), (1, 20, 1024), (4, 16, 1024), (64, 12, 1024), (2, 12, 1), (1, 12, 300)]
)
def test_split_plan_fills_the_gpu_and_covers_the_keys(B: int, H: int, S: int) -> None:
    block_n, sms = 64, 132
    split_size, num_splits = _split_plan(B, H, S, block_n, sms)
    assert split_size % block_n == 0
    assert (num_splits - 1) * split_size < S <= num_splits * split_size
    assert B * H * num_splits >= min(sms, B * H * math.ceil(S / block_n))


def test_rejects_bad_shapes() -> None:
    q = torch.randn(1, 2, 3, 24, device=DEVICE)
    k = torch.randn(1, 2, 5, 24, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        attention_prefill(q, k, k, _lengths([0]), _lengths([3]), 0.2)
    with pytest.raises(ValueError, match="per-row"):
        attention_decode(q[:, :, 0, :16], k[..., :16], k[..., :16], _lengths([3, 3]), 0.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_cuda_graph_replay() -> None:
    """A captured decode step replays correctly after kv_len and q change in place (no host syncs)."""
    gen = torch.Generator().manual_seed(7)
    B, H, S, D = 2, 12, 1024, 64
    k, v = _cache_views(B, H, S, D, torch.float16, gen)
    q = torch.randn(B, H, D, generator=gen).to(DEVICE, torch.float16)
    kl = _lengths([10, 700])
    attention_decode(q, k, v, kl, 0.125)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_decode(q, k, v, kl, 0.125)
    kl.copy_(_lengths([1000, 3]))
    q.copy_(torch.randn(B, H, D, generator=gen).to(DEVICE, torch.float16))
    graph.replay()
    ref64 = attention_decode_reference(q.double(), k.double(), v.double(), kl, 0.125)
    _assert_matches(out, ref64, attention_decode_reference(q, k, v, kl, 0.125), "graph replay")
