"""fp32 matmuls of more than 16 input rows on the CPU (a prefill's), on a C kernel where it beats oneDNN.

`csrc/prefill_matmul_f32.c` computes tiles of dot products (4 x 4 with AVX-512) straight from x and the weight as they
lie, summing the accumulators across lanes together, and prefetches the next weight block while it works on one.
oneDNN's GEMM packs and blocks for large matrices and loses time on the short, wide ones of a prefill. GFLOP/s of oneDNN
/ this kernel on an AMD EPYC (Zen 4), 2 threads, fastest of 10 interleaved, the weight warm in L3 (in x out features;
the FMA peak of the 2 cores is 232):

    rows   768 x 2304  768 x 768  768 x 3072  3072 x 768  1024 x 3072  1024 x 4096  1280 x 3840
    20     166 / 219   148 / 215  167 / 220   166 / 218   162 / 218    153 / 203    158 / 194
    32     184 / 224   173 / 222  185 / 224   184 / 222   180 / 220    172 / 205    174 / 196
    64     203 / 226   199 / 226  198 / 217   196 / 209   191 / 213    184 / 206    180 / 192
    128    208 / 225   211 / 229  213 / 222   214 / 217   205 / 203    206 / 216    204 / 197
    256    204 / 212   217 / 224  196 / 207   212 / 185   211 / 214    212 / 215    211 / 198

Inside a prefill each weight comes from DRAM. DialoGPT-small's 8 x 32-token prefill (256 rows), each matmul summed
over the 12 layers, oneDNN / this kernel, two runs: qkv 57.5 / 51.4 and 58.9 / 55.0 ms, c_proj 19.0 / 15.8 and
19.6 / 17.3, c_fc with gelu_new 71.4 / 68.1 and 73.0 / 71.3; but the MLP's c_proj (3072 in) 68.5 / 88.7, and
DialoGPT-medium's at 256 rows (1024 in) qkv 193 / 196, c_fc 251 / 262. So with AVX-512 it takes up to 64 rows
of any width, and more while x holds at most 256 rows of 768 (small's prefill of 8 x 32 tokens);
1-16 rows go to `gpt2.cpu.small_batch_matmul`, the rest to oneDNN. DialoGPT-small's 32-token prefill at batch 1 went
from 52.4 to 46.8 ms and medium's from 253.0 to 196.5 ms (with `gpt2.cpu.attention`, median of 11 and 7).

The table above is from before the prefetch, and before inputs wider than 1024 were summed in slices of 512 (each
slice's partial sums added into y): whole, a 4-row weight block of 3072 or 4096 floats no longer stays in L1 while x
streams past it. Rerun with both, weights streamed from DRAM (rotating copies over 80 MB), median of 12 interleaved,
oneDNN / before slicing / now:

    rows   3072 x 768         4096 x 1024        1024 x 4096 + gelu  768 x 2304 (not sliced)
    32     131 / 122 / 146    143 / 145 / 159    109 / 122 / 123     115 / 146 / 140
    64     161 / 129 / 177    174 / 153 / 197    144 / 172 / 175     144 / 191 / 186
    128    188 / 145 / 189    187 / 151 / 187
    256    196 / 153 / 176    203 / 141 / 177

So slicing turned a loss at 64 rows of the wide inputs into a win, and `any_width_rows` stays 64 (a tie at 128).
Slicing 768- and 1024-wide inputs too cost 4-7% at 256 rows (768 x 2304: 215 -> 200), so they stay whole.

With AVX2 (an AMD EPYC of Zen 2, 2 threads, FMA peak 197 GFLOP/s measured), the tiles are 4 W rows x 3 rows of x
(12 accumulators: AVX2 has 16 registers; 4 x 2 tiles reached 83-125 GFLOP/s where these reach 113-154). oneDNN / this
kernel, GFLOP/s, weights from DRAM, median of 8 interleaved:

    rows   768 x 2304  768 x 768  768 x 3072  3072 x 768  1024 x 3072  1024 x 1024  1024 x 4096  4096 x 1024
    32     51 / 84     63 / 92    48 / 84     65 / 95     42 / 88      56 / 84      42 / 96      65 / 102
    128    88 / 133    109 / 132  81 / 141    110 / 138   77 / 130     103 / 127    70 / 130     107 / 136
    256    88 / 141    120 / 142  91 / 148    122 / 122   88 / 142     116 / 140    87 / 145     121 / 125
    1024   107 / 150   106 / 140  113 / 150   123 / 120   111 / 152    111 / 147    115 / 153    118 / 121

so there it takes every size measured: up to 1024 rows (GPT-2's longest prompt), of any width.

On an Intel Xeon (AVX-512, AMX; 2 threads) oneDNN's fp32 GEMM runs near the FMA peak (2048^3: 331 GFLOP/s of 333 at
2.6 GHz; 256 x 768 x 2304: 295) and wins from 65 rows on, so there the kernel takes up to 64 rows only
(`TUNED_LIMITS`). One-token generates of 32-token prompts, median of 8 interleaved, the AVX-512 limits / oneDNN from
17 rows / up to 64 rows: small batch 8 191.5 / 175.0 / 178.7 ms, batch 1 43.6 / 49.4 / 43.5; medium batch 8 627.5 /
620.9 / 614.2 (4), batch 1 144.7 / 154.6 / 146.1 (6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import build, small_batch_matmul


@dataclass(frozen=True)
class Limits:
    """The sizes, beyond the small-batch kernel's 16 rows, where this kernel beats oneDNN (measured above)."""

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
