"""Tests of kernels/layer_norm.py: layer_norm and add_layer_norm against their torch references.

Without CUDA they run under the Triton interpreter on small shapes (C = 100 and 768, up to 99
rows). On a GPU the same tests run natively on cuda, which adds what the interpreter cannot show:
the compiled reductions, vectorised loads and the real fp16/bf16 conversions; the timings and
DialoGPT-sized shapes are in benchmarks/bench_kernels.py.

Tolerances: fp32 results are compared with the reference evaluated in float64 (atol 1e-5: fp32
rounding of values of order 1-10); fp16/bf16 results must satisfy
max|ours - ref| <= 2 * max|torch_lowp - ref| + eps, where ref is the float64 reference on the
upcast inputs and torch_lowp the torch reference run in the low-precision dtype itself.
"""

import math
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import (  # noqa: E402
    add_layer_norm,
    add_layer_norm_reference,
    layer_norm,
    layer_norm_reference,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The Triton 3.9 interpreter truncates fp32 -> bf16 casts where the GPU rounds to nearest, so under
# it bf16 outputs may carry up to one more bf16 ulp (2^-7 relative) of error than torch's.
TRUNCATING_BF16 = DEVICE == "cpu"
LOWP_EPS = {torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _assert_this_repos_kernels() -> None:
    """Another PyPI distribution is also importable as `kernels`; make sure it is not the one tested.

    Without a GPU the kernels must also have been decorated under TRITON_INTERPRET=1, which only
    works if it was set before anything (a conftest.py, say) first imported `kernels`.
    """
    found = Path(kernels.__file__).resolve().parent.parent
    assert found == REPO_ROOT, f"imported kernels from {kernels.__file__}, not from {REPO_ROOT}"
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        from kernels.layer_norm import _layer_norm_kernel

        assert isinstance(_layer_norm_kernel, InterpretedFunction), (
            "no GPU, and `kernels` was imported before TRITON_INTERPRET=1 was set: set it in the "
            "environment, or at the top of tests/conftest.py before it imports kernels or gpt2"
        )


_assert_this_repos_kernels()


def _assert_matches(ours: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, what: str) -> None:
    assert ours.dtype == torch_lowp.dtype and ours.shape == ref64.shape
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours.double(), ref64, atol=1e-5, rtol=0, msg=what)
        return
    err = (ours.double() - ref64).abs().max().item()
    base = (torch_lowp.double() - ref64).abs().max().item()
    slack = LOWP_EPS[ours.dtype]
    if ours.dtype == torch.bfloat16 and TRUNCATING_BF16:
        slack += 2.0 ** (math.floor(math.log2(max(ref64.abs().max().item(), 1e-30))) - 7)
    assert err <= 2 * base + slack, f"{what}: max err {err:.3g} vs torch's {base:.3g} (+{slack:.3g})"


def _params(C: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = (1.0 + 0.5 * torch.randn(C, generator=gen)).to(DEVICE, dtype)
    b = (0.5 * torch.randn(C, generator=gen)).to(DEVICE, dtype)
    return w, b


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
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
