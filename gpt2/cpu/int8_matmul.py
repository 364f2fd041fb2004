"""fp32 x int8 matmuls on a plain (out, in) int8 weight with one scale per output row (`gpt2.cpu.int8_linear`'s), each
input row quantized on its own, to uint8 with a zero point, by the rule fbgemm applies to a whole input.

Up to 64 rows run on this engine's C kernel (`csrc/small_batch_matmul_int8.c`, the int8 decode step's), in passes
of up to 16; more rows (a long prefill's) through torch._int_mm (oneDNN's int8 GEMM: VNNI or AMX products, exact
int32 sums) with the same quantization done in torch (`quantize_rows`), so they get the C kernel's values: a
prompt's tokens the outputs a decode step would give them, one plain weight serving both. Each pass of the C kernel
reads the whole weight, and torch._int_mm costs a dozen small torch ops a call besides: measured, the passes are the
faster up to 64 rows. Where the C kernel cannot run (the kernels not built, an input width not a multiple of 64)
every row count goes through torch._int_mm.
Measured: docs/performance.md#gpt2memorypy-what-a-loaded-model-costs
"""

from __future__ import annotations

import torch

from . import build

MAX_ROWS = 16  # the C kernel's rows a call (SMALL_BATCH_MAX_ROWS in csrc/small_batch_matmul.h)
C_KERNEL_MAX_ROWS = 64  # up to this many rows the C kernel runs, in passes of 16 (see the module docstring)
COLS_MULTIPLE = 64  # the C kernel reads 64 int8 a vector
_LEAST_SCALE = 6.1e-5  # fbgemm's least activation scale (choose_qparams in csrc/small_batch_matmul_int8.c)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (rows, cols) fp32 as uint8 values q = round(x / scale) + zero_point in [0, 255], a scale and zero point per
    row chosen as csrc/small_batch_matmul_int8.c's choose_qparams (fbgemm's, reduce_range off) chooses them.

    Returns (q - 128 as int8 (rows, cols), scale (rows, 1) fp32, zero_point (rows, 1) int32): torch._int_mm takes
    int8, and the shift by 128 is undone exactly in `matmul`'s int32 sums.
    """
    least = torch.tensor(_LEAST_SCALE, dtype=torch.float32)  # the C float constant
    lo, hi = torch.aminmax(x, dim=1, keepdim=True)
    lo, hi = lo.clamp_(max=0), hi.clamp_(min=0)
    s = (hi.double() - lo.double()) / 255
    s.masked_fill_((s.float() == 0) | torch.isinf(1 / s.float()), 0.1)
    small = s < least.double()
    if small.any():  # a row spanning less than the least scale: widen [lo, hi] to what it spans
        amplifier = least / s.float()
        lo, hi = (torch.where(small & (lo != 0), torch.where(hi == 0, -least * 255, lo * amplifier), lo),
                  torch.where(small, torch.where(lo == 0, least * 255, torch.where(hi == 0, hi, hi * amplifier)), hi))
        s = torch.where(small, least.double(), s)
    lo_steps, hi_steps = lo.double() / s, hi.double() / s
    # the zero point from whichever end rounds it with the smaller error, rounded half to even as nearbyint
    zero_point = torch.where(-lo_steps.abs() < 255 - hi_steps.abs(), -lo_steps, 255 - hi_steps).round_().clamp_(0, 255)
    scale = s.float()
    q = (x * (1 / scale)).round_().add_(zero_point.float()).clamp_(0, 255).sub_(128).to(torch.int8)
    return q, scale, zero_point.int()


def matmul(x: torch.Tensor, weight: torch.Tensor, weight_rows: torch.Tensor) -> torch.Tensor:
    """x (..., in) fp32 against weight (out, in) int8 with weight_rows (out, 3) fp32 (each row's scale, bias and sum
    of its int8 values, csrc/int8.h's int8_row) -> (..., out) fp32: x quantized row by row (see the module
    docstring), int8 products summed exactly, y = x_scale w_scale (sum - x_zero_point w_sum) + bias."""
    out_features, cols = weight.shape
    x2 = x.reshape(-1, cols).float().contiguous()
    rows = x2.shape[0]
    if rows <= C_KERNEL_MAX_ROWS and cols % COLS_MULTIPLE == 0 and build.int8_available():
        y = torch.empty(rows, out_features)
        for start in range(0, rows, MAX_ROWS):  # each pass reads the whole weight again: only a few
            n = min(MAX_ROWS, rows - start)
            status = build.library().small_batch_matmul_int8(weight.data_ptr(), weight_rows.data_ptr(),
                                                             x2[start].data_ptr(), y[start].data_ptr(), n,
                                                             out_features, cols, 0)
            if status == -2:
                raise MemoryError("small_batch_matmul_int8: out of memory for the quantized input")
    else:
        q, scale, zero_point = quantize_rows(x2)
        sums = torch._int_mm(q, weight.t())  # (rows, out) int32: sum of (q - 128) w
        sums += (128 - zero_point) * weight_rows[:, 2].int()  # sum of (q - zero_point) w, exact in int32
        y = torch.addcmul(weight_rows[:, 1], sums.float(), scale * weight_rows[:, 0])
    return y.view(*x.shape[:-1], out_features)
