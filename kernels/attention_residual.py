"""Decode attention + the out-projection + bias + the residual add: the middle of a fused decode step's layer.

Two kernels. The first is flash-decoding's split kernel (kernels/attention_decode.py: per (row, head) and chunk of
keys, a partial output and its log-sum-exp). The second merges those splits as it reads them: each K tile of the
out-projection's input, y[b, h * D + d], is the log-sum-exp-weighted mean of the partials of head h, computed in the
matvec's prologue, so attention's own merge kernel and its output tensor disappear. Its matvec and atomic epilogue
are kernels/linear_residual.py's: split over columns and K, partial sums added into the fp32 residual stream.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._device import sm_count
from ._dot import dot_options
from ._matvec import accumulate, add_into, matvec_plan
from .attention_decode import attention_decode_partials, attention_decode_reference


@triton.jit
def _merged_tile(O_part, LSE_part, offs_b, b_ok, offs_k, k_ok, H, num_splits, HEAD_DIM: tl.constexpr):
    """Attention output at rows offs_b, columns offs_k (head k // D, dim k % D) from its splits: (BLOCK_B, BLOCK_K)
    fp32, 0 where masked."""
    mask = b_ok[:, None] & k_ok[None, :]
    head = (offs_k // HEAD_DIM).to(tl.int64)
    part = (offs_b[:, None] * H + head[None, :]) * num_splits  # (BLOCK_B, BLOCK_K): split 0 of (b, h)
    o_ptrs = O_part + part * HEAD_DIM + (offs_k % HEAD_DIM)[None, :]
    m = tl.full(mask.shape, float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(LSE_part + part + s, mask=mask, other=float("-inf")))
    m = tl.where(m > float("-inf"), m, 0.0)  # every split empty: weights all 0
    total = tl.zeros(mask.shape, tl.float32)
    weight = tl.zeros(mask.shape, tl.float32)
    for s in range(num_splits):
        w = tl.exp2(tl.load(LSE_part + part + s, mask=mask, other=float("-inf")) - m)
        total += w * tl.load(o_ptrs + s * HEAD_DIM, mask=mask, other=0.0)
        weight += w
    return total / tl.where(weight > 0.0, weight, 1.0)


@triton.jit
def _attention_out_kernel(
    O_part, LSE_part, W, Bias, R,
    B, N, K, H, num_splits, stride_w, stride_r, k_per_split,
    HAS_BIAS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    offs_b = (tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    n_ok, b_ok = offs_n < N, offs_b < B
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        y = _merged_tile(O_part, LSE_part, offs_b, b_ok, offs_k, k_ok, H, num_splits, HEAD_DIM)
        acc = accumulate(acc, y, W, stride_w, offs_n, n_ok, offs_k, k_ok, BLOCK_B, PRECISION, UPCAST)
    add_into(R, stride_r, offs_b, b_ok, offs_n, n_ok, acc, Bias, split == 0, HAS_BIAS)


def attention_residual(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor, sm_scale: float, weight: Tensor,
                       bias: Tensor | None, residual: Tensor) -> Tensor:
    """residual += attention(q, k, v) W^T + b, in place; returns residual.

    q (B, H, D) (any strides), k, v (B, H, S, D) in q's dtype, kv_len (B,) int >= 1: as `attention_decode`.
    weight (C, C) with C = H * D, in q's dtype; bias (C,) or None; residual (B, C) fp32. The attention output is
    rounded to q's dtype before the projection, as the unfused step's is.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be (B, H, D), got {tuple(q.shape)}")
    B, H, D = q.shape
    C = H * D
    if weight.shape != (C, C) or weight.dtype != q.dtype or weight.stride(1) != 1:
        raise ValueError(f"weight must be ({C}, {C}) in q's dtype {q.dtype} with unit column stride, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if bias is not None and (bias.shape != (C,) or bias.stride(0) != 1):
        raise ValueError(f"bias must be contiguous ({C},), got {tuple(bias.shape)}")
    if residual.shape != (B, C) or residual.dtype != torch.float32 or residual.stride(1) != 1:
        raise ValueError(f"residual must be fp32 ({B}, {C}) with unit column stride, got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    o_part, lse_part = attention_decode_partials(q, k, v, kv_len, sm_scale)
    N = K = C
    plan = matvec_plan(B, N, K, sm_count(q.device), may_split_k=True)
    _attention_out_kernel[plan.grid(B, N)](
        o_part, lse_part, weight, weight if bias is None else bias, residual,
        B, N, K, H, lse_part.shape[1], weight.stride(0), residual.stride(0), plan.k_per_split,
        HAS_BIAS=bias is not None, HEAD_DIM=D, BLOCK_B=plan.block_b, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        **dot_options(weight.dtype, q.device), num_warps=4,
    )
    return residual


def attention_residual_reference(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor, sm_scale: float, weight: Tensor,
                                 bias: Tensor | None, residual: Tensor) -> Tensor:
    """Plain torch: `attention_decode_reference`, F.linear in q's dtype, added into residual in place."""
    y = attention_decode_reference(q, k, v, kv_len, sm_scale).reshape(q.shape[0], -1)  # (B, C)
    return residual.add_(F.linear(y, weight, bias).to(residual.dtype))
