"""fp32 matmuls of 1 to 8 input rows on the CPU (a decode step's), on a small AVX-512 kernel built once with `cc`.

A decode step at batch b reads every weight once for b rows, so up to a few rows its matmuls are bound by how
fast they stream the weights. Torch's fastest route on the AMD EPYC (Zen 4) this engine is tuned on is oneDNN,
which runs one row as `brg_matmul:avx2` (`ONEDNN_VERBOSE=1`); MKL streams at half its speed on AMD.
`csrc/small_batch_matmul_f32.c` walks a block of weight rows at once with one AVX-512 accumulator per (input row,
weight row), prefetching each row's stream ahead. All DialoGPT-small decode matmuls in sequence (494 MB,
cold; 2 threads, fastest of 5 interleaved, in a quiet minute of a machine whose bandwidth drifts 1.5x):

    input rows      1          2          4          8
    oneDNN          15.1 ms    22.6 ms    25.0 ms    29.4 ms
    this kernel     10.0 ms    11.2 ms    16.5 ms    21.5 ms

(a plain max-reduction over the same bytes: 8.5 ms). Above 8 rows oneDNN's GEMM is used.

The kernel is built with the engine's other C kernels (see `gpt2.cpu_kernels`); where they are unavailable the
model keeps oneDNN. A decode step of plain fp32 blocks runs its block matmuls inside `gpt2.decode_blocks`; this
module serves the lm_head and every other fp32 matmul of 1-8 rows.
"""

from __future__ import annotations

import torch

from . import cpu_kernels

MAX_ROWS = 8  # input rows the kernel takes; larger batches are compute-bound and stay on oneDNN's GEMM
COLS_MULTIPLE = 16  # the kernel reads each row of x and W in 16-float vectors


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """1-8 fp32 rows on the CPU against a contiguous fp32 weight whose width the kernel takes, outside autograd."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and weight.is_contiguous()
            and x.shape[-1] == weight.shape[1] and 1 <= x.numel() // weight.shape[1] <= MAX_ROWS
            and weight.shape[1] % COLS_MULTIPLE == 0 and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and cpu_kernels.library() is not None)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """x (..., in) of 1-8 rows, weight (out, in), bias (out,) or None -> x W^T + b, (..., out), through gelu_new
    with gelu (computed as x / (1 + exp(-2u)), within 1e-6 of torch's tanh form); see `applies`."""
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()
    rows = x.numel() // x.shape[-1]
    y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)
    cpu_kernels.library().small_batch_matmul_f32(weight.data_ptr(), x.data_ptr(),
                                                 0 if bias is None else bias.data_ptr(), y.data_ptr(), rows,
                                                 weight.shape[0], weight.shape[1], gelu)
    return y
