"""The CPU small-batch fp32 matmul kernel (gpt2/small_batch_matmul.py, gpt2/csrc/small_batch_matmul_f32.c) against
F.linear (and F.gelu after it; tolerance in tests/linear_reference.py), where it applies, and its gelu_new."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2 import cpu_kernels, small_batch_matmul
from tests.linear_reference import check_matches_linear

needs_kernel = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                                  reason=f"C kernels unavailable: {cpu_kernels.unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize("out_features, in_features", [(2304, 768), (768, 3072), (5, 16), (17, 32), (33, 48)])
@pytest.mark.parametrize("n_rows", range(1, small_batch_matmul.MAX_ROWS + 1))
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
@torch.inference_mode()
def test_matches_linear(out_features, in_features, n_rows, with_bias, gelu):
    """Every row count the kernel has (each its own block shape), W row counts that leave partial blocks."""
    check_matches_linear(small_batch_matmul, n_rows, out_features, in_features, with_bias, gelu)


@needs_kernel
def test_applies_only_to_what_it_can_take():
    weight, x = torch.randn(64, 32), torch.randn(1, 32)
    with torch.inference_mode():
        assert small_batch_matmul.applies(x, weight, None)
        assert small_batch_matmul.applies(torch.randn(8, 32), weight, None)
        assert not small_batch_matmul.applies(torch.randn(17, 32), weight, None)  # a prefill: oneDNN's GEMM
        assert not small_batch_matmul.applies(torch.randn(0, 32), weight, None)
        assert not small_batch_matmul.applies(x.half(), weight.half(), None)
        assert not small_batch_matmul.applies(x.bfloat16(), weight.bfloat16(), None)
        assert not small_batch_matmul.applies(torch.randn(1, 24), torch.randn(64, 24), None)  # width % 16 != 0
        assert not small_batch_matmul.applies(x, torch.randn(32, 64).t(), None)  # not contiguous
        assert not small_batch_matmul.applies(x, weight, torch.randn(64).double())
    assert not small_batch_matmul.applies(x, weight.requires_grad_(), None)  # autograd keeps F.linear


@needs_kernel
@torch.inference_mode()
def test_fused_gelu_is_as_exact_as_torchs():
    """gelu_new through the kernel's exp on [-20, 20] against the fp64 truth, x * sigmoid(2u) (the tanh form in fp64
    rounds to 0 below x = -6): no further off than torch's own fp32 tanh form in absolute error, which is where its
    worst lies (measured: 5.1e-7 vs 4.3e-7), and within its relative error (1.0e-6 vs 4.7e-5, its 1 + tanh cancels)."""
    x = torch.linspace(-20, 20, 40000).view(-1, 16)
    identity = torch.eye(16)  # x I = x exactly: the kernel's output is gelu_new(x)
    got = torch.cat([small_batch_matmul.matmul(rows, identity, None, gelu=True) for rows in x.split(8)]).double()
    x64 = x.double()
    exact = x64 * torch.sigmoid(2 * 0.7978845608028654 * (x64 + 0.044715 * x64 ** 3))
    torch_fp32 = F.gelu(x, approximate="tanh").double()
    assert (got - exact).abs().max() <= 2 * (torch_fp32 - exact).abs().max()
    visible = exact.abs() > 1e-3
    def relative(y: torch.Tensor) -> torch.Tensor:
        return ((y - exact).abs() / exact.abs())[visible].max()

    assert relative(got) <= relative(torch_fp32)
