"""The decode matvec that the fused decode kernels share: a few rows (a decode step's batch) times a weight (N, K).

Each program owns BLOCK_N output columns of BLOCK_B rows and, where the launcher splits K, one slice of K. It reads
its weight tile once, contiguous along K (wide loads), and accumulates in fp32; the rows' inputs are rounded to the
weight's dtype before the products, as F.linear in that dtype rounds them. One row (BLOCK_B 1) is a multiply and
reduce; several rows are padded to 16 for tl.dot (tensor cores on a GPU). The prologues that make a row's input
(LayerNorm of the fp32 residual stream; the merge of decode-attention splits) and the epilogues (bias, GELU, KV-cache
append, atomic add into the residual) belong to each kernel's file; `matvec_plan` sizes the grid from shapes and the
SM count only, so the kernels launch without host syncs and can be captured in a CUDA graph.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._dot import dot

_PROGRAMS_PER_SM = 2  # programs to aim for per SM: each streams its own weight tile
_ROWS_PER_DOT = 16  # the smallest M of tl.dot; batches of 2-16 rows share one weight read
# Tile widths along K: one row streams (BLOCK_N, 128) weight tiles; a dot tile is (16, 64) @ (64, BLOCK_N).
_BLOCK_K_ONE_ROW = 128
_BLOCK_K_DOT = 64
_BLOCK_N_CHOICES = (64, 32, 16)  # widest first; 16 is tl.dot's minimum


@dataclass(frozen=True)
class MatvecPlan:
    block_b: int
    block_n: int
    block_k: int
    split_k: int  # programs along K; their partial sums meet in an fp32 atomic add
    k_per_split: int  # a multiple of block_k

    def grid(self, B: int, N: int) -> tuple[int, int, int]:
        """(column blocks, K splits, row blocks)."""
        return triton.cdiv(N, self.block_n), self.split_k, triton.cdiv(B, self.block_b)


def matvec_plan(B: int, N: int, K: int, sms: int, may_split_k: bool) -> MatvecPlan:
    """Tiles for B rows of a (N, K) weight: the widest column block that still gives every SM _PROGRAMS_PER_SM
    programs, then, where the kernel adds into fp32 with atomics (may_split_k), K split until it does."""
    block_b = 1 if B == 1 else _ROWS_PER_DOT
    block_k = max(16, min(_BLOCK_K_ONE_ROW if B == 1 else _BLOCK_K_DOT, triton.next_power_of_2(K)))
    row_blocks = triton.cdiv(B, block_b)
    target = _PROGRAMS_PER_SM * sms
    block_n = next((n for n in _BLOCK_N_CHOICES if triton.cdiv(N, n) * row_blocks >= target), _BLOCK_N_CHOICES[-1])
    split_k = 1
    if may_split_k:
        while triton.cdiv(N, block_n) * row_blocks * split_k < target and K >= 2 * split_k * block_k:
            split_k *= 2
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    return MatvecPlan(block_b, block_n, block_k, triton.cdiv(K, k_per_split), k_per_split)


def check_matvec(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[int, int, int]:
    """(B, N, K) for rows x (B, K) and weight (N, K) with unit column strides, bias (N,) or None; else ValueError."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be (B, K) and weight (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight must have unit stride along K")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"weight dtype {weight.dtype} is not fp32, fp16 or bf16")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.stride(0) != 1):
        raise ValueError(f"bias must be contiguous ({weight.shape[0]},), got {tuple(bias.shape)}")
    return x.shape[0], weight.shape[0], weight.shape[1]


@triton.jit
def ln_stats(X, stride_x, offs_b, b_ok, K, eps, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """LayerNorm statistics (mean, rstd), (BLOCK_B,) fp32 each, of rows offs_b of X over K columns: two passes over
    the row (from cache), the second centred and corrected by the centred sum, as kernels/layer_norm.py."""
    total = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = b_ok[:, None] & (offs_k < K)[None, :]
        total += tl.sum(tl.load(X + offs_b[:, None] * stride_x + offs_k[None, :], mask=mask, other=0.0)
                        .to(tl.float32), axis=1)
    mean = total / K
    dev = tl.zeros([BLOCK_B], tl.float32)
    sq = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = b_ok[:, None] & (offs_k < K)[None, :]
        x = tl.load(X + offs_b[:, None] * stride_x + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, x - mean[:, None], 0.0)  # (BLOCK_B, BLOCK_K)
        dev += tl.sum(xc, axis=1)
        sq += tl.sum(xc * xc, axis=1)
    var = (sq - dev * dev / K) / K
    return mean, 1.0 / tl.sqrt_rn(var + eps)


@triton.jit
def ln_tile(X, stride_x, offs_b, b_ok, offs_k, k_ok, mean, rstd, LnW, LnB):
    """LayerNorm(X) at rows offs_b, columns offs_k: (BLOCK_B, BLOCK_K) fp32, 0 where masked."""
    mask = b_ok[:, None] & k_ok[None, :]
    x = tl.load(X + offs_b[:, None] * stride_x + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(LnW + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    b = tl.load(LnB + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    return tl.where(mask, (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :], 0.0)


@triton.jit
def accumulate(acc, x, W, stride_w, offs_n, n_ok, offs_k, k_ok,
               BLOCK_B: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc (BLOCK_B, BLOCK_N) fp32 + x (BLOCK_B, BLOCK_K) @ W[offs_n, offs_k]^T, x rounded to W's dtype first."""
    w = tl.load(W + offs_n[:, None] * stride_w + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                other=0.0)  # (BLOCK_N, BLOCK_K)
    x = x.to(W.dtype.element_ty)
    if BLOCK_B == 1:
        return acc + tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
    else:
        return dot(x, tl.trans(w), acc, PRECISION, UPCAST)


@triton.jit
def add_into(R, stride_r, offs_b, b_ok, offs_n, n_ok, acc, Bias, first_split, HAS_BIAS: tl.constexpr):
    """R[offs_b, offs_n] (fp32) += acc, plus the bias from the first K split only: an atomic add, since the K splits
    of a column block add into the same elements."""
    if HAS_BIAS:
        bias = tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(first_split, bias, 0.0)[None, :]
    tl.atomic_add(R + offs_b[:, None] * stride_r + offs_n[None, :], acc, mask=b_ok[:, None] & n_ok[None, :],
                  sem="relaxed")
