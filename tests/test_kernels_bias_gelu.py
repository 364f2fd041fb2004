"""Tests of kernels/bias_gelu.py: bias add + GPT-2 tanh GELU against its torch reference.

Without CUDA they run under the Triton interpreter on small shapes (N = 100, 768 and 3072). On a
GPU the same tests run natively on cuda, which adds the compiled exp and division (fast-math
approximations the interpreter's numpy does not have); timings and DialoGPT-sized shapes are in
benchmarks/bench_kernels.py.

Tolerances: fp32 results are compared with the reference evaluated in float64 (rtol 1e-5 plus
atol 1e-6: a few fp32 ulps of the output, and the output grows like |u|); fp16/bf16 results must
satisfy max|ours - ref| <= 2 * max|torch_lowp - ref| + eps, where ref is the float64 reference on
the upcast inputs and torch_lowp the torch reference run in the low-precision dtype itself.
"""

import math
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import bias_gelu, bias_gelu_reference  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The Triton 3.9 interpreter truncates fp32 -> bf16 casts where the GPU rounds to nearest, so under
# it bf16 outputs may carry up to one more bf16 ulp (2^-7 relative) of error than torch's.
TRUNCATING_BF16 = DEVICE == "cpu"
LOWP_EPS = {torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _assert_this_repos_kernels() -> None:
    """Another PyPI distribution is also importable as `kernels`; make sure it is not the one tested.

    Without a GPU the kernels must also have been decorated under TRITON_INTERPRET=1, which only
    works if it was set before anything (a conftest.py, say) first imported `kernels`.
    """
    found = Path(kernels.__file__).resolve().parent.parent
    assert found == REPO_ROOT, f"imported kernels from {kernels.__file__}, not from {REPO_ROOT}"
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        from kernels.bias_gelu import _bias_gelu_kernel

        assert isinstance(_bias_gelu_kernel, InterpretedFunction), (
            "no GPU, and `kernels` was imported before TRITON_INTERPRET=1 was set: set it in the "
            "environment, or at the top of tests/conftest.py before it imports kernels or gpt2"
        )


_assert_this_repos_kernels()


def _assert_matches(ours: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, what: str) -> None:
    ref64 = bias_gelu_reference(x.double(), bias.double())
    assert ours.dtype == x.dtype and ours.shape == x.shape
    assert torch.isfinite(ours).all(), what
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours.double(), ref64, atol=1e-6, rtol=1e-5, msg=what)
        return
    err = (ours.double() - ref64).abs().max().item()
    base = (bias_gelu_reference(x, bias).double() - ref64).abs().max().item()
    slack = LOWP_EPS[ours.dtype]
    if ours.dtype == torch.bfloat16 and TRUNCATING_BF16:
        slack += 2.0 ** (math.floor(math.log2(max(ref64.abs().max().item(), 1e-30))) - 7)
    assert err <= 2 * base + slack, f"{what}: max err {err:.3g} vs torch's {base:.3g} (+{slack:.3g})"


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
