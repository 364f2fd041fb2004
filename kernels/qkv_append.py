"""ln_1 + the QKV matvec + bias + the KV-cache append, in one kernel: the first of a fused decode step's layer.

The LayerNorm prologue and the matvec are kernels/ln_linear.py's (kernels/_matvec.py). The epilogue routes each of
the 3C output columns: the query to q (B, C), the key and value of head h, dimension d to the cache at each row's
own slot (`slots[b]`, its position), so the step needs no scatter kernels and rows may sit at different positions.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._device import sm_count
from ._dot import dot_options
from ._matvec import accumulate, check_matvec, ln_stats, ln_tile, matvec_plan
from .ln_linear import ln_linear_reference


@triton.jit
def _ln_qkv_append_kernel(
    X, LnW, LnB, W, Bias, Q, KCache, VCache, Slots,
    B, C, stride_x, stride_w, stride_q,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    eps,
    HEAD_DIM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = (tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    n_ok, b_ok = offs_n < 3 * C, offs_b < B
    mean, rstd = ln_stats(X, stride_x, offs_b, b_ok, C, eps, BLOCK_B, BLOCK_K)
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < C
        x = ln_tile(X, stride_x, offs_b, b_ok, offs_k, k_ok, mean, rstd, LnW, LnB)
        acc = accumulate(acc, x, W, stride_w, offs_n, n_ok, offs_k, k_ok, BLOCK_B, PRECISION, UPCAST)
    acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]

    part = offs_n // C  # 0: query, 1: key, 2: value
    col = offs_n % C
    head = (col // HEAD_DIM).to(tl.int64)
    dim = (col % HEAD_DIM).to(tl.int64)
    slot = tl.load(Slots + offs_b, mask=b_ok, other=0).to(tl.int64)  # (BLOCK_B,)
    ok = b_ok[:, None] & n_ok[None, :]
    tl.store(Q + offs_b[:, None] * stride_q + col[None, :], acc.to(Q.dtype.element_ty),
             mask=ok & (part == 0)[None, :])
    k_ptrs = (KCache + offs_b[:, None] * stride_kb + head[None, :] * stride_kh + slot[:, None] * stride_ks
              + dim[None, :] * stride_kd)
    tl.store(k_ptrs, acc.to(KCache.dtype.element_ty), mask=ok & (part == 1)[None, :])
    v_ptrs = (VCache + offs_b[:, None] * stride_vb + head[None, :] * stride_vh + slot[:, None] * stride_vs
              + dim[None, :] * stride_vd)
    tl.store(v_ptrs, acc.to(VCache.dtype.element_ty), mask=ok & (part == 2)[None, :])


def _check_cache(weight: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, B: int) -> int:
    """The head dim, after checking the caches (B, H, S, D) with H * D == C and slots (B,); else ValueError."""
    C = weight.shape[1]
    if weight.shape[0] != 3 * C:
        raise ValueError(f"the QKV weight must be (3C, C), got {tuple(weight.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != B:
        raise ValueError(f"caches must be (B={B}, H, S, D) alike, got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    H, D = k_cache.shape[1], k_cache.shape[3]
    if H * D != C:
        raise ValueError(f"cache heads {H} x head dim {D} != C = {C}")
    if slots.shape != (B,):
        raise ValueError(f"slots must be ({B},), got {tuple(slots.shape)}")
    return D


def ln_qkv_append(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor, k_cache: Tensor,
                  v_cache: Tensor, slots: Tensor, eps: float) -> Tensor:
    """qkv = LayerNorm(x) W^T + b for x (B, C) (the fp32 residual stream), weight (3C, C), bias (3C,), as
    `ln_linear`; writes each row's key and value, head by head, into k_cache, v_cache (B, H, S, D) at slot slots[b]
    (rounded to the cache's dtype) and returns the query (B, C) in weight's dtype. slots (B,) int, each < S."""
    B, N, C = check_matvec(x, weight, bias)
    if bias is None:
        raise ValueError("the QKV layer needs a bias")
    D = _check_cache(weight, k_cache, v_cache, slots, B)
    if ln_weight.shape != (C,) or ln_bias.shape != (C,):
        raise ValueError(f"LayerNorm weight and bias must be ({C},)")
    q = torch.empty((B, C), dtype=weight.dtype, device=x.device)
    plan = matvec_plan(B, N, C, sm_count(x.device), may_split_k=False)
    _ln_qkv_append_kernel[plan.grid(B, N)](
        x, ln_weight.contiguous(), ln_bias.contiguous(), weight, bias, q, k_cache, v_cache, slots,
        B, C, x.stride(0), weight.stride(0), q.stride(0), *k_cache.stride(), *v_cache.stride(), eps,
        HEAD_DIM=D, BLOCK_B=plan.block_b, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        **dot_options(weight.dtype, x.device), num_warps=4,
    )
    return q


def ln_qkv_append_reference(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
                            k_cache: Tensor, v_cache: Tensor, slots: Tensor, eps: float) -> Tensor:
    """Plain torch: `ln_linear_reference`, then an indexed write of each row's key and value at its slot."""
    B, C = x.shape
    D = _check_cache(weight, k_cache, v_cache, slots, B)
    q, k, v = ln_linear_reference(x, ln_weight, ln_bias, weight, bias, eps).split(C, dim=1)  # each (B, C)
    rows = torch.arange(B, device=x.device)
    k_cache[rows, :, slots.long()] = k.reshape(B, -1, D).to(k_cache.dtype)  # (B, H, D) at (b, :, slots[b])
    v_cache[rows, :, slots.long()] = v.reshape(B, -1, D).to(v_cache.dtype)
    return q
