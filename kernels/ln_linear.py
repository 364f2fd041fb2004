"""LayerNorm fused into the prologue of the matvec that follows it, with bias and optionally gelu_new in its epilogue.

For the fused decode step: ln_2 + c_fc + bias + GELU (the MLP's first half), and ln_f + lm_head. The input is the
step's fp32 residual stream, a few rows; every program computes its rows' LayerNorm statistics itself (the rows are
a few KB, read from cache) and normalises each K tile on its way into the matvec (kernels/_matvec.py), so the
normalised rows are never written out and no kernel boundary separates the LayerNorm from its matvec.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._device import sm_count
from ._dot import dot_options
from ._matvec import accumulate, check_matvec, ln_stats, ln_tile, matvec_plan
from .bias_gelu import bias_gelu_reference, gelu_new


@triton.jit
def _ln_linear_kernel(
    X, LnW, LnB, W, Bias, Y,
    B, N, K, stride_x, stride_w, stride_y, eps,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = (tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    n_ok, b_ok = offs_n < N, offs_b < B
    mean, rstd = ln_stats(X, stride_x, offs_b, b_ok, K, eps, BLOCK_B, BLOCK_K)
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = ln_tile(X, stride_x, offs_b, b_ok, offs_k, k_ok, mean, rstd, LnW, LnB)
        acc = accumulate(acc, x, W, stride_w, offs_n, n_ok, offs_k, k_ok, BLOCK_B, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = gelu_new(acc)
    tl.store(Y + offs_b[:, None] * stride_y + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=b_ok[:, None] & n_ok[None, :])


def ln_linear(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor | None, eps: float,
              gelu: bool = False) -> Tensor:
    """LayerNorm(x) W^T + b, through gelu_new with `gelu`: x (B, K) (fp32, the residual stream, or any float dtype),
    weight (N, K), bias (N,) or None. LayerNorm in fp32, its output rounded to weight's dtype, fp32 accumulation;
    returns (B, N) in weight's dtype."""
    B, N, K = check_matvec(x, weight, bias)
    if ln_weight.shape != (K,) or ln_bias.shape != (K,):
        raise ValueError(f"LayerNorm weight and bias must be ({K},), got {tuple(ln_weight.shape)}, "
                         f"{tuple(ln_bias.shape)}")
    y = torch.empty((B, N), dtype=weight.dtype, device=x.device)
    plan = matvec_plan(B, N, K, sm_count(x.device), may_split_k=False)
    _ln_linear_kernel[plan.grid(B, N)](
        x, ln_weight.contiguous(), ln_bias.contiguous(), weight, weight if bias is None else bias, y,
        B, N, K, x.stride(0), weight.stride(0), y.stride(0), eps,
        HAS_BIAS=bias is not None, GELU=gelu,
        BLOCK_B=plan.block_b, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        **dot_options(weight.dtype, x.device), num_warps=4,
    )
    return y


def ln_linear_reference(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor | None,
                        eps: float, gelu: bool = False) -> Tensor:
    """Plain torch: LayerNorm of x in fp32 (in fp64 for fp64 inputs), rounded to weight's dtype, then F.linear in
    that dtype, and with `gelu` the bias added by `bias_gelu_reference` instead, as the Triton backend's MLP does."""
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    normed = F.layer_norm(x.to(wide), (x.shape[-1],), ln_weight.to(wide), ln_bias.to(wide), eps).to(weight.dtype)
    if gelu:
        return bias_gelu_reference(F.linear(normed, weight), 0.0 if bias is None else bias)
    return F.linear(normed, weight, bias)
