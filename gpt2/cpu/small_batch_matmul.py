"""fp32 and bf16 matmuls of 1 to 16 input rows on the CPU (a decode step's), on small C kernels built once with `cc`
(AVX-512, or AVX2 and FMA: see `gpt2.cpu.build`).

A decode step at batch b reads every weight once for b rows, so up to a few rows its matmuls are bound by how
fast they stream the weights. Torch's fastest route on the AMD EPYC (Zen 4) this engine is tuned on is oneDNN,
which runs one row as `brg_matmul:avx2` (`ONEDNN_VERBOSE=1`); MKL streams at half its speed on AMD.
`csrc/small_batch_matmul_f32.c` walks a block of weight rows at once with one vector accumulator per (input row,
weight row), prefetching the next block as each streams (block shapes: csrc/small_batch_loop.h). It measured faster
than oneDNN at every row count from 1 to 16, by the widest margin with AVX2, where oneDNN's small matmuls are slower
still; a last pass of fewer than 4 rows narrows its lead. More rows go to `gpt2.cpu.prefill_matmul` or
oneDNN's GEMM.

The kernel is built with the engine's other C kernels (see `gpt2.cpu.build`); where they are unavailable the
model keeps oneDNN. A decode step of plain fp32 blocks runs its block matmuls inside `gpt2.cpu.decode_blocks`; this
module serves the lm_head and every other fp32 matmul of 1-16 rows.

`matmul_bf16` is the same loop on bf16 (`csrc/small_batch_matmul_bf16.c`: avx512_bf16 dot products into fp32),
for a bf16 model's decode steps (`gpt2.cpu.bf16_linear`): at 1-16 rows faster than oneDNN on its packed layout or on
the plain one.

Measured: docs/performance.md#gpt2cpusmall_batch_matmulpy-the-decode-matmuls
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import build

MAX_ROWS = 16  # input rows the kernel takes (SMALL_BATCH_MAX_ROWS in csrc/small_batch_matmul.h)
VECTOR_BYTES = 64  # the kernels read each row of x and W in 64-byte vectors: 16 fp32 or 32 bf16 elements


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """1-16 fp32 rows on the CPU against a contiguous fp32 weight whose width the kernel takes, outside autograd."""
    return 1 <= kernel_rows(x, weight, bias) <= MAX_ROWS


def kernel_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype = torch.float32) -> int:
    """x's row count where a C matmul kernel of `run_matmul_kernel`'s signature for dtype (fp32; bf16 for
    `matmul_bf16`) takes these tensors (all of dtype on the CPU, a contiguous weight of a width in whole vectors,
    outside autograd, the kernel runnable here), else 0."""
    cols = weight.shape[1]
    takes = (x.device.type == "cpu" and x.dtype == weight.dtype == dtype and weight.is_contiguous()
             and x.shape[-1] == cols and cols * weight.element_size() % VECTOR_BYTES == 0
             and (bias is None or bias.dtype == dtype)
             and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
             and (build.bf16_available() if dtype == torch.bfloat16 else build.library() is not None))
    return x.numel() // cols if takes else 0


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """x (..., in) of 1-16 rows, weight (out, in), bias (out,) or None -> x W^T + b, (..., out), through gelu_new
    with gelu (computed as x / (1 + exp(-2u)), within 1e-6 of torch's tanh form); see `applies`."""
    return run_matmul_kernel(build.library().small_batch_matmul_f32, x, weight, bias, gelu)


def applies_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """1-16 bf16 rows on the CPU against a contiguous bf16 weight of a width in whole 32-element vectors and a bf16
    bias or none, outside autograd, where the bf16 kernel runs (`gpt2.cpu.build.bf16_available`)."""
    return 1 <= kernel_rows(x, weight, bias, torch.bfloat16) <= MAX_ROWS


def matmul_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """x (..., in) bf16 of 1-16 rows, weight (out, in) bf16, bias (out,) bf16 or None -> x W^T + b (..., out) bf16,
    summed in fp32 and rounded once, through gelu_new with gelu; see `applies_bf16`."""
    return run_matmul_kernel(build.library().small_batch_matmul_bf16, x, weight, bias, gelu)


def run_matmul_kernel(kernel: Callable[..., int], x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      gelu: bool) -> torch.Tensor:
    """x W^T + b (..., out), in x's dtype, through a C matmul kernel of this signature (`csrc/small_batch_matmul.h`),
    one that takes x's row count, width and dtype (its caller's `applies` has checked)."""
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()
    rows = x.numel() // x.shape[-1]
    y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype)
    kernel(weight.data_ptr(), x.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(), rows,
           weight.shape[0], weight.shape[1], gelu)
    return y
