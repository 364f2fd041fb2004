"""The CPU small-batch fp32 matmul kernel (gpt2/small_batch_matmul.py, gpt2/small_batch_matmul_f32.c) against
F.linear, where it applies, and how it says why it is unavailable. Tolerance: 1e-5 relative to the output's
scale (both sum in fp32, in a different order; measured ~1e-7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2 import small_batch_matmul

needs_kernel = pytest.mark.skipif(small_batch_matmul.unavailable_reason() is not None,
                                  reason=f"kernel unavailable: {small_batch_matmul.unavailable_reason()}")


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty engine cache and no loaded kernel; the process's kernel is restored afterwards."""
    monkeypatch.setenv("GPT2_ENGINE_CACHE", str(tmp_path))
    small_batch_matmul._load.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    small_batch_matmul._load.cache_clear()


@needs_kernel
@pytest.mark.parametrize("out_features, in_features", [(2304, 768), (768, 3072), (5, 16), (17, 32), (33, 48)])
@pytest.mark.parametrize("n_rows", range(1, small_batch_matmul.MAX_ROWS + 1))
@pytest.mark.parametrize("with_bias", [True, False])
@torch.inference_mode()
def test_matches_linear(out_features, in_features, n_rows, with_bias):
    """Every row count the kernel has (each its own block shape), W row counts that leave partial blocks."""
    torch.manual_seed(out_features + n_rows)
    weight = torch.randn(out_features, in_features) * 0.02  # GPT-2's initialisation scale
    bias = torch.randn(out_features) * 0.02 if with_bias else None
    inputs = [torch.randn(n_rows, in_features), torch.randn(n_rows, 1, in_features),  # (B, C), (B, T=1, C)
              torch.randn(n_rows, 2 * in_features)[:, :in_features]]  # a strided view
    for x in inputs:
        assert small_batch_matmul.applies(x, weight, bias)
        expected = F.linear(x, weight, bias)
        got = small_batch_matmul.matmul(x, weight, bias)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@needs_kernel
def test_applies_only_to_what_it_can_take():
    weight, x = torch.randn(64, 32), torch.randn(1, 32)
    with torch.inference_mode():
        assert small_batch_matmul.applies(x, weight, None)
        assert small_batch_matmul.applies(torch.randn(8, 32), weight, None)
        assert not small_batch_matmul.applies(torch.randn(9, 32), weight, None)  # a prefill: oneDNN's GEMM
        assert not small_batch_matmul.applies(torch.randn(0, 32), weight, None)
        assert not small_batch_matmul.applies(x.half(), weight.half(), None)
        assert not small_batch_matmul.applies(x.bfloat16(), weight.bfloat16(), None)
        assert not small_batch_matmul.applies(torch.randn(1, 24), torch.randn(64, 24), None)  # width % 16 != 0
        assert not small_batch_matmul.applies(x, torch.randn(32, 64).t(), None)  # not contiguous
        assert not small_batch_matmul.applies(x, weight, torch.randn(64).double())
    assert not small_batch_matmul.applies(x, weight.requires_grad_(), None)  # autograd keeps F.linear


def test_turned_off_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("GPT2_CPU_KERNEL", "0")
    assert small_batch_matmul.unavailable_reason() == "turned off by GPT2_CPU_KERNEL=0"
    assert not small_batch_matmul.applies(torch.randn(1, 32), torch.randn(64, 32), None)
    assert "oneDNN (the small-batch kernel is unavailable: turned off" in small_batch_matmul.status()


@needs_kernel
def test_no_compiler_is_reported(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    assert "no C compiler found ('no-such-compiler-xyz'" in small_batch_matmul.unavailable_reason()


@needs_kernel
def test_failed_compile_is_reported_and_leaves_nothing(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert "compiling small_batch_matmul_f32.c with" in small_batch_matmul.unavailable_reason()
    assert not list((fresh_build / "kernels").glob("*.so"))


@needs_kernel
def test_unwritable_cache_is_reported(fresh_build, monkeypatch):
    blocker = fresh_build / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("GPT2_ENGINE_CACHE", str(blocker))
    assert "cannot build or load" in small_batch_matmul.unavailable_reason()
    assert not small_batch_matmul.applies(torch.randn(1, 32), torch.randn(64, 32), None)  # oneDNN then, no error


@needs_kernel
def test_built_once_then_loaded_from_the_cache(fresh_build):
    assert small_batch_matmul.unavailable_reason() is None
    assert small_batch_matmul.compile_seconds() > 0
    assert "built in" in small_batch_matmul.status()
    assert len(list((fresh_build / "kernels").glob("small_batch_matmul_f32-*.so"))) == 1
    small_batch_matmul._load.cache_clear()
    assert small_batch_matmul.unavailable_reason() is None
    assert small_batch_matmul.compile_seconds() == 0.0
    assert "loaded from the cache" in small_batch_matmul.status()
