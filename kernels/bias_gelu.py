"""Bias add fused with GPT-2's tanh GELU (`gelu_new`), the MLP's activation.

gelu_new(u) = 0.5 * u * (1 + tanh(a)) with a = sqrt(2/pi) * (u + 0.044715 * u^3). Since
0.5 * (1 + tanh(a)) = sigmoid(2a), the kernel computes u * sigmoid(2a) in fp32 from
z = exp(-|2a|) only: no tanh is needed (tl has none in some versions), no cancellation near zero,
no overflow, and for large |u| the result saturates to u or 0 without NaN.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_CUBIC = tl.constexpr(0.044715)
_BLOCK_N_MAX = 1024


@triton.jit
def gelu_new(u):
    """gelu_new of fp32 u, elementwise (also the fused decode step's c_fc epilogue, kernels/ln_linear.py)."""
    two_a = 2.0 * _SQRT_2_OVER_PI * (u + _GELU_CUBIC * u * u * u)
    z = tl.exp(-tl.abs(two_a))  # in [0, 1]: never overflows
    return u * tl.where(two_a >= 0.0, 1.0, z) / (1.0 + z)  # u * sigmoid(2a)


@triton.jit
def _bias_gelu_kernel(X, Bias, Y, stride_x, stride_y, N, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_row = cols < N
    x = tl.load(X + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)  # (BLOCK_N,)
    y = gelu_new(x + tl.load(Bias + cols, mask=in_row, other=0.0).to(tl.float32))
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=in_row)


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """gelu_new(x + bias) for x (..., N) and bias (N,), computed in fp32, returned in x's dtype."""
    N = x.shape[-1]
    if bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    x2 = x.reshape(-1, N)  # (M, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, N)
    block_n = min(_BLOCK_N_MAX, triton.next_power_of_2(N))
    grid = (x2.shape[0], triton.cdiv(N, block_n))
    _bias_gelu_kernel[grid](
        x2, bias.contiguous(), y2, x2.stride(0), y2.stride(0), N,
        BLOCK_N=block_n, num_warps=4 if block_n >= 512 else 2,
    )
    return y


def bias_gelu_reference(x: Tensor, bias: Tensor) -> Tensor:
    """Plain-torch gelu_new(x + bias) in x's dtype, written as in GPT-2."""
    u = x + bias
    return 0.5 * u * (1.0 + torch.tanh(_SQRT_2_OVER_PI.value * (u + _GELU_CUBIC.value * torch.pow(u, 3.0))))
