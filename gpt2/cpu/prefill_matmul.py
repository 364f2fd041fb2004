"""fp32 matmuls of more than 16 input rows on the CPU (a prefill's), on a C kernel where it beats oneDNN.

`csrc/prefill_matmul_f32.c` computes tiles of dot products (4 x 4 with AVX-512; with AVX2, 4 W rows x 3 rows of x, 12
accumulators of its 16 registers) straight from x and the weight as they lie, summing the accumulators across lanes
together, and prefetches the next weight block while it works on one. Inputs wider than 1024 are summed in slices of
512, each slice's partial sums added into y, so that a 4-row weight block stays in L1 while x streams past it;
768- and 1024-wide inputs stay whole, where slicing cost time.

oneDNN's GEMM packs and blocks for large matrices and loses time on the short, wide ones of a prefill; it catches up
as the rows grow, and sooner where it runs near the FMA peak, so the kernel takes only the sizes where it measured
faster (`limits`): with AVX-512 up to 64 rows of any width, and more while x holds at most 256 rows of 768
(DialoGPT-small's prefill of 8 x 32 tokens); with AVX2 every size measured, up to 1024 rows (GPT-2's longest prompt);
on an Intel Xeon with AVX-512, whose oneDNN GEMM runs near the FMA peak, up to 64 rows only (`TUNED_LIMITS`). 1-16
rows go to `gpt2.cpu.small_batch_matmul`, the rest to oneDNN.

Measured: docs/performance.md#gpt2cpuprefill_matmulpy-when-the-c-prefill-matmul-runs
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import build, small_batch_matmul


@dataclass(frozen=True)
class Limits:
    """The sizes, beyond the small-batch kernel's 16 rows, where this kernel beats oneDNN (see the module docstring)."""

    any_width_rows: int  # up to this many rows, whatever the shapes
    max_input_floats: int  # more rows while x holds at most this many floats


LIMITS = {"AVX-512": Limits(64, 256 * 768), "AVX2": Limits(1024, 0)}  # by `build.instruction_set()`
TUNED_LIMITS = {("GenuineIntel", "6", "AVX-512"): Limits(64, 0)}  # by `build.cpu_kind()` and instruction set


def limits() -> Limits:
    """This CPU's limits: its own (`TUNED_LIMITS`) where measured, else its instruction set's."""
    isa = build.instruction_set()
    return TUNED_LIMITS.get((*build.cpu_kind(), isa), LIMITS[isa])


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """More than 16 fp32 rows on the CPU, of the sizes where the kernel wins on this CPU (`limits`),
    against a contiguous fp32 weight whose width it takes, outside autograd (`small_batch_matmul.kernel_rows`)."""
    rows = small_batch_matmul.kernel_rows(x, weight, bias)
    if rows <= small_batch_matmul.MAX_ROWS:
        return False
    sizes = limits()
    return rows <= sizes.any_width_rows or x.numel() <= sizes.max_input_floats


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """x (..., in) of more than 16 rows, weight (out, in), bias (out,) or None -> x W^T + b, (..., out), through
    gelu_new with gelu (computed as x / (1 + exp(-2u)), within 1e-6 of torch's tanh form); see `applies`."""
    return small_batch_matmul.run_matmul_kernel(build.library().prefill_matmul_f32, x, weight, bias, gelu)
