"""Tests of kernels/bias_gelu.py: bias add + GPT-2 tanh GELU against its torch reference.

Without CUDA they run under the Triton interpreter on small shapes (N = 100, 768 and 3072). On a
GPU the same tests run natively on cuda, which adds the compiled exp and division (fast-math
approximations the interpreter's numpy does not have); timings and DialoGPT-sized shapes are in
benchmarks/bench_kernels.py.

Tolerances: fp32 results are compared with the reference evaluated in float64 (rtol 1e-5 plus
atol 1e-6: a few fp32 ulps of the output, and the output grows like |u|); fp16/bf16 results must
satisfy max|ours - ref| <= 2 * max|torch_lowp - ref| + eps, the rule of tests/kernel_tolerances.py.
"""

import pytest
import torch

from gpt2_kernels.bias_gelu import bias_gelu, bias_gelu_reference
from tests.kernel_tolerances import DEVICE, DTYPES, assert_matches


def _assert_matches(ours: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, what: str) -> None:
    ref64 = bias_gelu_reference(x.double(), bias.double())
    assert_matches(ours, ref64, bias_gelu_reference(x, bias), what, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3072), (3, 7, 100), (33, 768)])
def test_bias_gelu_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (2.0 * torch.randn(shape, generator=gen)).to(DEVICE, dtype)
    bias = torch.randn(shape[-1], generator=gen).to(DEVICE, dtype)
    _assert_matches(bias_gelu(x, bias), x, bias, f"bias_gelu {shape} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_gelu_large_arguments(dtype: torch.dtype) -> None:
    """Large |u| saturates the tanh: results must be u or 0, never NaN or inf (u^3 overflows fp16)."""
    u = torch.tensor([-3e4, -1e3, -60.0, -41.0, -9.0, -1e-3, 0.0, 1e-3, 9.0, 41.0, 60.0, 1e3, 3e4])
    x = u.repeat(2, 1).to(DEVICE, dtype)
    bias = torch.zeros(u.numel(), dtype=dtype, device=DEVICE)
    _assert_matches(bias_gelu(x, bias), x, bias, f"large |u| {dtype}")


def test_bias_gelu_strided_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(5, 140, generator=gen).to(DEVICE)
    x = wide[:, 40:]
    bias = torch.randn(100, generator=gen).to(DEVICE)
    _assert_matches(bias_gelu(x, bias), x, bias, "strided rows")
