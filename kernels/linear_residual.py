"""c_proj + bias + the residual add, in one kernel: the last of a fused decode step's layer (the MLP's second half).

The matvec (kernels/_matvec.py) splits over output columns and, where those alone leave SMs idle (N = C is small:
768 columns for DialoGPT-small), over K too; every program adds its partial sum straight into the step's fp32
residual stream with an atomic add, the first K split adding the bias. So no second pass reduces the splits, and the
residual is read and written once. fp32 atomics make the sum of the (at most a few) K splits' partials run in
whatever order they land: results may differ between runs by fp32 rounding.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._device import sm_count
from ._dot import dot_options
from ._matvec import accumulate, add_into, check_matvec, matvec_plan


@triton.jit
def _linear_residual_kernel(
    X, W, Bias, R,
    B, N, K, stride_x, stride_w, stride_r, k_per_split,
    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
        x = tl.load(X + offs_b[:, None] * stride_x + offs_k[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        acc = accumulate(acc, x, W, stride_w, offs_n, n_ok, offs_k, k_ok, BLOCK_B, PRECISION, UPCAST)
    add_into(R, stride_r, offs_b, b_ok, offs_n, n_ok, acc, Bias, split == 0, HAS_BIAS)


def linear_residual(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor) -> Tensor:
    """residual += x W^T + b, in place: x (B, K) in weight's dtype, weight (N, K), bias (N,) or None, residual (B, N)
    fp32. fp32 accumulation; returns residual."""
    B, N, K = check_matvec(x, weight, bias)
    if residual.shape != (B, N) or residual.dtype != torch.float32 or residual.stride(1) != 1:
        raise ValueError(f"residual must be fp32 ({B}, {N}) with unit column stride, got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    plan = matvec_plan(B, N, K, sm_count(x.device), may_split_k=True)
    _linear_residual_kernel[plan.grid(B, N)](
        x, weight, weight if bias is None else bias, residual,
        B, N, K, x.stride(0), weight.stride(0), residual.stride(0), plan.k_per_split,
        HAS_BIAS=bias is not None, BLOCK_B=plan.block_b, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        **dot_options(weight.dtype, x.device), num_warps=4,
    )
    return residual


def linear_residual_reference(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor) -> Tensor:
    """Plain torch: residual += F.linear(x, weight, bias) (in weight's dtype, then widened), in place."""
    return residual.add_(F.linear(x, weight, bias).to(residual.dtype))
