"""LayerNorm over the last dimension, alone or fused with the residual add that precedes it.

One Triton kernel serves both entry points: each program normalises one row held entirely in
registers, with fp32 statistics computed in two passes over the registers (mean first, then the
centred sum of squares, with the mean corrected by the centred sum), so inputs far from zero keep
their accuracy. `add_layer_norm` adds the residual in fp32 inside the same pass, writes the sum in
the input dtype and normalises the fp32 sum.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

# A whole row lives in one program's registers; wider rows would spill.
_MAX_BLOCK_C = 16384


@triton.jit
def _layer_norm_kernel(
    X, R, H, Y, W, B,
    stride_x, stride_r, stride_h, stride_y,
    C, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    in_row = cols < C
    x = tl.load(X + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)  # (BLOCK_C,)
    if HAS_RESIDUAL:
        x += tl.load(R + row * stride_r + cols, mask=in_row, other=0.0).to(tl.float32)
        tl.store(H + row * stride_h + cols, x.to(H.dtype.element_ty), mask=in_row)
    mean = tl.sum(x, axis=0) / C
    xc = tl.where(in_row, x - mean, 0.0)  # (BLOCK_C,)
    # Corrected two-pass: remove the rounding error of the first mean, which for rows far from
    # zero (|mean| >> std) is the dominant fp32 error.
    xc = tl.where(in_row, xc - tl.sum(xc, axis=0) / C, 0.0)
    var = tl.sum(xc * xc, axis=0) / C
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
    y = xc * rstd * w + b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=in_row)


def _as_rows(t: Tensor) -> Tensor:
    """View (..., C) as (rows, C) with unit column stride; copies only when no such view exists."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    C = x.shape[-1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"weight and bias must have shape ({C},), got {tuple(weight.shape)} and {tuple(bias.shape)}")
    block_c = triton.next_power_of_2(C)
    if block_c > _MAX_BLOCK_C:
        raise ValueError(f"layer_norm supports C <= {_MAX_BLOCK_C}, got {C}")
    x2 = _as_rows(x)  # (M, C)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, C)
    if residual is None:
        r2, h, h2 = x2, y, y2  # unused by the kernel when HAS_RESIDUAL is off
    else:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        r2 = _as_rows(residual)
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        h2 = h.view(-1, C)
    _layer_norm_kernel[(x2.shape[0],)](
        x2, r2, h2, y2, weight.contiguous(), bias.contiguous(),
        x2.stride(0), r2.stride(0), h2.stride(0), y2.stride(0),
        C, eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_C=block_c,
        num_warps=min(max(block_c // 256, 1), 8),
    )
    return h, y


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm of x (..., C) over C; fp32 statistics, output in x's dtype."""
    return _launch(x, None, weight, bias, eps)[1]


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """h = x + residual and y = LayerNorm(h) in one pass; returns (h, y) in x's dtype.

    The statistics are taken from the fp32 sum, before h is rounded to the input dtype.
    """
    return _launch(x, residual, weight, bias, eps)


def layer_norm_reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Plain-torch LayerNorm over the last dimension, in x's dtype."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm_reference(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Plain-torch residual add followed by LayerNorm, in x's dtype; returns (h, y)."""
    h = x + residual
    return h, layer_norm_reference(h, weight, bias, eps)
