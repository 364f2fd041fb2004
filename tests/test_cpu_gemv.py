"""The batch-1 fp32 CPU matmul kernel (gpt2/cpu_gemv.py, gpt2/gemv_f32.c) against F.linear, where it applies,
and how it says why it is unavailable. Tolerance: 1e-5 relative to the output's scale (both sum in fp32 in a
different order; measured ~1e-7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2 import cpu_gemv

needs_kernel = pytest.mark.skipif(cpu_gemv.unavailable_reason() is not None,
                                  reason=f"kernel unavailable: {cpu_gemv.unavailable_reason()}")


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty engine cache and no loaded kernel; the process's kernel is restored afterwards."""
    monkeypatch.setenv("GPT2_ENGINE_CACHE", str(tmp_path))
    cpu_gemv._load.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    cpu_gemv._load.cache_clear()


@needs_kernel
@pytest.mark.parametrize("rows, cols", [(2304, 768), (768, 3072), (5, 16), (17, 32), (33, 48)])
@pytest.mark.parametrize("with_bias", [True, False])
@torch.inference_mode()
def test_matches_linear(rows, cols, with_bias):
    torch.manual_seed(rows)
    weight = torch.randn(rows, cols) * 0.02  # GPT-2's initialisation scale
    bias = torch.randn(rows) * 0.02 if with_bias else None
    for x in (torch.randn(1, cols), torch.randn(1, 1, cols), torch.randn(3, cols)[1:2]):
        assert cpu_gemv.applies(x, weight, bias)
        expected = F.linear(x, weight, bias)
        got = cpu_gemv.gemv(x, weight, bias)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@needs_kernel
def test_applies_only_to_one_fp32_row_it_can_take():
    weight, x = torch.randn(64, 32), torch.randn(1, 32)
    with torch.inference_mode():
        assert cpu_gemv.applies(x, weight, None)
        assert not cpu_gemv.applies(torch.randn(2, 32), weight, None)  # a batch: oneDNN's GEMM
        assert not cpu_gemv.applies(x.half(), weight.half(), None)
        assert not cpu_gemv.applies(x.bfloat16(), weight.bfloat16(), None)
        assert not cpu_gemv.applies(torch.randn(1, 24), torch.randn(64, 24), None)  # width not a multiple of 16
        assert not cpu_gemv.applies(x, torch.randn(32, 64).t(), None)  # not contiguous
        assert not cpu_gemv.applies(x, weight, torch.randn(64).double())
    assert not cpu_gemv.applies(x, weight.requires_grad_(), None)  # autograd keeps F.linear


def test_turned_off_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("GPT2_CPU_GEMV", "0")
    assert cpu_gemv.unavailable_reason() == "turned off by GPT2_CPU_GEMV=0"
    assert not cpu_gemv.applies(torch.randn(1, 32), torch.randn(64, 32), None)


@needs_kernel
def test_no_compiler_is_reported(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    assert "no C compiler found ('no-such-compiler-xyz'" in cpu_gemv.unavailable_reason()


@needs_kernel
def test_failed_compile_is_reported_and_leaves_nothing(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert "compiling gemv_f32.c with" in cpu_gemv.unavailable_reason()
    assert not list((fresh_build / "kernels").glob("*.so"))


@needs_kernel
def test_built_once_then_loaded_from_the_cache(fresh_build):
    assert cpu_gemv.unavailable_reason() is None
    assert cpu_gemv.compile_seconds() > 0
    assert len(list((fresh_build / "kernels").glob("gemv_f32-*.so"))) == 1
    cpu_gemv._load.cache_clear()
    assert cpu_gemv.unavailable_reason() is None
    assert cpu_gemv.compile_seconds() == 0.0


@needs_kernel
def test_unwritable_cache_is_reported(fresh_build, monkeypatch):
    blocker = fresh_build / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("GPT2_ENGINE_CACHE", str(blocker))
    assert "cannot build or load" in cpu_gemv.unavailable_reason()
    assert not cpu_gemv.applies(torch.randn(1, 32), torch.randn(64, 32), None)  # oneDNN then, no error
