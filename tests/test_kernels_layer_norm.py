"""Tests of kernels/layer_norm.py: layer_norm and add_layer_norm against their torch references.

Without CUDA they run under the Triton interpreter on small shapes (C = 100 and 768, up to 99
rows). On a GPU the same tests run natively on cuda, which adds what the interpreter cannot show:
the compiled reductions, vectorised loads and the real fp16/bf16 conversions; the timings and
DialoGPT-sized shapes are in benchmarks/bench_kernels.py.

Tolerances: fp32 results are compared with the reference evaluated in float64 (atol 1e-5: fp32
rounding of values of order 1-10); fp16/bf16 results must satisfy
max|ours - ref| <= 2 * max|torch_lowp - ref| + eps, the rule of tests/kernel_tolerances.py.
"""

from functools import partial

import pytest
import torch

from gpt2_kernels.layer_norm import add_layer_norm, add_layer_norm_reference, layer_norm, layer_norm_reference
from tests.kernel_tolerances import DEVICE, DTYPES, TRUNCATING_BF16, assert_matches

_assert_matches = partial(assert_matches, atol=1e-5)


def _params(C: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = (1.0 + 0.5 * torch.randn(C, generator=gen)).to(DEVICE, dtype)
    b = (0.5 * torch.randn(C, generator=gen)).to(DEVICE, dtype)
    return w, b


# (shape, shift): shift moves the inputs far from zero, where one-pass variance formulas fail.
CASES = [((1, 768), 0.0), ((3, 7, 100), -20.0), ((2, 33, 100), 5.0), ((4, 768), -20.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,shift", CASES)
def test_layer_norm_matches_reference(shape: tuple[int, ...], shift: float, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (shift + 0.5 * torch.randn(shape, generator=gen)).to(DEVICE, dtype)
    w, b = _params(shape[-1], dtype, gen)
    ours = layer_norm(x, w, b)
    ref64 = layer_norm_reference(x.double(), w.double(), b.double())
    _assert_matches(ours, ref64, layer_norm_reference(x, w, b), f"layer_norm {shape} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_strided_rows(dtype: torch.dtype) -> None:
    """Row-strided views (a last-token slice, a column slice of a wider buffer) are read in place."""
    gen = torch.Generator().manual_seed(1)
    wide = (-20.0 + 0.5 * torch.randn(3, 9, 130, generator=gen)).to(DEVICE, dtype)
    w, b = _params(100, dtype, gen)
    for x in (wide[:, -1, :100], wide[:, ::2, 30:]):
        assert not x.is_contiguous()
        ours = layer_norm(x, w, b)
        ref64 = layer_norm_reference(x.double(), w.double(), b.double())
        _assert_matches(ours, ref64, layer_norm_reference(x, w, b), f"strided {tuple(x.shape)} {dtype}")


def test_layer_norm_eps_is_used_exactly() -> None:
    """Rows with variance ~1e-6 and exactly 0: the result depends on eps = 1e-5 itself."""
    gen = torch.Generator().manual_seed(2)
    x = 3.0 + 1e-3 * torch.randn(4, 100, generator=gen)
    x[1] = 7.0  # zero variance: y must be exactly the bias
    x = x.to(DEVICE)
    w, b = _params(100, torch.float32, gen)
    ours = layer_norm(x, w, b, eps=1e-5)
    torch.testing.assert_close(ours.double(), layer_norm_reference(x.double(), w.double(), b.double(), 1e-5),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[1], b, atol=0, rtol=0)
    assert not torch.allclose(ours, layer_norm(x, w, b, eps=1e-3), atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,shift", CASES)
def test_add_layer_norm_matches_reference(shape: tuple[int, ...], shift: float, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    x = (shift + 0.5 * torch.randn(shape, generator=gen)).to(DEVICE, dtype)
    r = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    w, b = _params(shape[-1], dtype, gen)
    h, y = add_layer_norm(x, r, w, b)
    # The sum is rounded once from fp32, exactly as torch's own low-precision add rounds it (up to
    # the interpreter's bf16 truncation).
    ulp = 2.0**-7 if dtype == torch.bfloat16 and TRUNCATING_BF16 else 0.0
    torch.testing.assert_close(h, (x.double() + r.double()).to(dtype), atol=0, rtol=ulp)
    h64, y64 = add_layer_norm_reference(x.double(), r.double(), w.double(), b.double())
    _, y_lowp = add_layer_norm_reference(x, r, w, b)
    _assert_matches(y, y64, y_lowp, f"add_layer_norm {shape} {dtype}")


def test_add_layer_norm_strided_inputs() -> None:
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(2, 7, 160, generator=gen, device="cpu").to(DEVICE)
    x, r = wide[..., :100], wide[..., 60:]
    w, b = _params(100, torch.float32, gen)
    h, y = add_layer_norm(x, r, w, b)
    h64, y64 = add_layer_norm_reference(x.double(), r.double(), w.double(), b.double())
    torch.testing.assert_close(h.double(), h64, atol=1e-6, rtol=0)
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=0)


def test_layer_norm_rejects_mismatched_weight() -> None:
    x = torch.randn(2, 100, device=DEVICE)
    with pytest.raises(ValueError):
        layer_norm(x, torch.ones(99, device=DEVICE), torch.zeros(100, device=DEVICE))
