"""The CPU small-batch fp32 matmul kernel (gpt2/small_batch_matmul.py, gpt2/cpu/csrc/small_batch_matmul_f32.c) against
F.linear (and F.gelu after it; tolerance in tests/linear_reference.py), where it applies, and its gelu_new."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2.cpu import build, small_batch_matmul
from tests.linear_reference import check_matches_linear

needs_kernel = pytest.mark.skipif(build.unavailable_reason() is not None,
                                  reason=f"C kernels unavailable: {build.unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize("out_features, in_features",
                         [(2304, 768), (768, 3072), (5, 16), (17, 32), (33, 48), (13, 2064)])
@pytest.mark.parametrize("n_rows", range(1, small_batch_matmul.MAX_ROWS + 1))
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
@torch.inference_mode()
def test_matches_linear(out_features, in_features, n_rows, with_bias, gelu):
    """Every row count the kernel has (each its own block shape), W row counts that leave partial blocks; rows over
    2048 columns (13 x 2064: a full block and a partial one) take the long-row shape at one input row."""
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


needs_bf16_kernel = pytest.mark.skipif(not build.bf16_available(),
                                       reason="the bf16 kernel needs the C kernels and a CPU with avx512_bf16")


@needs_bf16_kernel
@pytest.mark.parametrize("out_features, in_features", [(2304, 768), (768, 3072), (5, 32), (17, 64), (33, 96)])
@pytest.mark.parametrize("n_rows", range(1, small_batch_matmul.MAX_ROWS + 1))
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
@torch.inference_mode()
def test_bf16_matches_linear(out_features, in_features, n_rows, with_bias, gelu):
    """bf16 in and out, fp32 sums: each output is the exact result (fp64 on the same bf16 inputs) rounded once, so
    within half a bf16 ulp of it (2^-8 relative: truncating instead fails) beyond twice the fp32 sum's rounding (at
    most cols * 2^-24 of sum |x w|, bounded by 1e-6 of it here) and, with gelu, its fp32 exp (1e-6 absolute, see
    the test above). oneDNN's bf16 linear (gelu applied before its one rounding, as here) is held to the same
    bound, and passes it."""
    g = torch.Generator().manual_seed(out_features * 100 + n_rows)
    x = torch.randn(n_rows, in_features, generator=g).bfloat16()
    weight = (torch.randn(out_features, in_features, generator=g) * 0.05).bfloat16()
    bias = (torch.randn(out_features, generator=g) * 0.05).bfloat16() if with_bias else None
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    if gelu:
        exact = F.gelu(exact, approximate="tanh")
    sum_error = 1e-6 * (x.double().abs() @ weight.double().abs().T) + (1e-6 if gelu else 0.0)
    assert small_batch_matmul.applies_bf16(x, weight, bias)
    got = small_batch_matmul.matmul_bf16(x, weight, bias, gelu=gelu)
    onednn = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "tanh" if gelu else "")
    assert got.dtype == torch.bfloat16 and got.shape == (n_rows, out_features)
    for name, y in [("kernel", got), ("oneDNN", onednn)]:
        excess = (y.double() - exact).abs() - (2.0 ** -8 * exact.abs() + 2 * sum_error)
        assert excess.max() <= 0, f"{name}: {excess.max():.3g} beyond the bound"


@needs_bf16_kernel
def test_bf16_applies_only_to_what_it_can_take():
    weight, x = torch.randn(64, 32).bfloat16(), torch.randn(1, 32).bfloat16()
    with torch.inference_mode():
        assert small_batch_matmul.applies_bf16(x, weight, None)
        assert small_batch_matmul.applies_bf16(torch.randn(16, 32).bfloat16(), weight, None)
        assert not small_batch_matmul.applies_bf16(torch.randn(17, 32).bfloat16(), weight, None)  # a prefill: oneDNN
        assert not small_batch_matmul.applies_bf16(torch.randn(0, 32).bfloat16(), weight, None)
        assert not small_batch_matmul.applies_bf16(x.float(), weight.float(), None)
        assert not small_batch_matmul.applies_bf16(x.half(), weight.half(), None)
        assert not small_batch_matmul.applies_bf16(torch.randn(1, 48).bfloat16(), torch.randn(64, 48).bfloat16(), None)
        assert not small_batch_matmul.applies_bf16(x, torch.randn(32, 64).bfloat16().t(), None)  # not contiguous
        assert not small_batch_matmul.applies_bf16(x, weight, torch.randn(64))  # an fp32 bias
    assert not small_batch_matmul.applies_bf16(x, weight.requires_grad_(), None)  # autograd keeps oneDNN
