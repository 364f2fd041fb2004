"""fp32 matmuls of 17-64 input rows on the CPU (a short prefill chunk's), on an AVX-512 C kernel that beats oneDNN there.

`csrc/prefill_matmul_f32.c` computes 4 x 4 tiles of dot products straight from x and the weight as they lie, summing
16 accumulators across lanes at once. oneDNN's GEMM packs and blocks for large matrices and loses time on the short,
wide ones of a chat turn's prefill. GFLOP/s of oneDNN / this kernel on an AMD EPYC (Zen 4), 2 threads, fastest of 10
interleaved, the weight warm in L3 (in x out features; the FMA peak of the 2 cores is 232):

    rows   768 x 2304  768 x 768  768 x 3072  3072 x 768  1024 x 3072  1024 x 4096  1280 x 3840
    20     166 / 219   148 / 215  167 / 220   166 / 218   162 / 218    153 / 203    158 / 194
    32     184 / 224   173 / 222  185 / 224   184 / 222   180 / 220    172 / 205    174 / 196
    64     203 / 226   199 / 226  198 / 217   196 / 209   191 / 213    184 / 206    180 / 192
    128    208 / 225   211 / 229  213 / 222   214 / 217   205 / 203    206 / 216    204 / 197
    256    204 / 212   217 / 224  196 / 207   212 / 185   211 / 214    212 / 215    211 / 198

Inside a prefill, with each weight coming from DRAM, the lead shrinks with the rows: DialoGPT-small's 32-token
prefill at batch 1 (32 rows) went from 52.4 to 46.8 ms (median of 11, interleaved, with `gpt2.cpu_attention`), but at
batch 8 (256 rows) its qkv matmuls took 57.6 ms against oneDNN's 56.8 and c_fc with gelu_new 74.7 against 70.3. So it
takes up to MAX_ROWS rows; 1-16 go to `gpt2.small_batch_matmul`, more to oneDNN.
"""

from __future__ import annotations

import torch

from . import cpu_kernels, small_batch_matmul

MAX_ROWS = 64
COLS_MULTIPLE = 16  # the kernel reads each row of x and W in 16-float vectors


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """17-64 fp32 rows on the CPU against a contiguous fp32 weight whose width the kernel takes, outside autograd."""
    cols = weight.shape[1]
    rows = x.numel() // cols if x.shape[-1] == cols else 0
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and weight.is_contiguous()
            and small_batch_matmul.MAX_ROWS < rows <= MAX_ROWS and cols % COLS_MULTIPLE == 0
            and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and cpu_kernels.library() is not None)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """x (..., in) of 17-64 rows, weight (out, in), bias (out,) or None -> x W^T + b, (..., out), through gelu_new
    with gelu (computed as x / (1 + exp(-2u)), within 1e-6 of torch's tanh form); see `applies`."""
    return small_batch_matmul.run_matmul_kernel(cpu_kernels.library().prefill_matmul_f32, x, weight, bias, gelu)
