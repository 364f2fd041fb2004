"""The CPU prefill fp32 matmul kernel (gpt2/prefill_matmul.py, gpt2/cpu/csrc/prefill_matmul_f32.c) against F.linear (and
F.gelu after it; tolerance in tests/linear_reference.py), and where it applies."""

from __future__ import annotations

import pytest
import torch

from gpt2.cpu import build, prefill_matmul
from tests.linear_reference import check_matches_linear

pytestmark = pytest.mark.skipif(build.unavailable_reason() is not None,
                                reason=f"C kernels unavailable: {build.unavailable_reason()}")


# (out, in) features; inputs over 1024 wide are summed in slices of 512: 3072 in six, 1040 in two and a partial one
SHAPES = [(2304, 768), (770, 3072), (21, 1040), (33, 1024), (5, 16), (17, 48), (64, 32)]
SIZES = ([(n_rows, *shape) for n_rows in (17, 18, 19, 20, 33, 63, 64) for shape in SHAPES]  # each partial tile
         + [(n_rows, *shape) for n_rows in (65, 201, 256) for shape in SHAPES if shape[1] <= 768])  # up to 256 x 768


@pytest.mark.parametrize("n_rows, out_features, in_features", SIZES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
@torch.inference_mode()
def test_matches_linear(out_features, in_features, n_rows, with_bias, gelu, monkeypatch):
    """Row and weight-row counts that leave partial tiles on either side, inputs of any leading shape and strides
    (all of them taken by the kernel here, whatever this instruction set's limits for oneDNN's sizes)."""
    monkeypatch.setattr(prefill_matmul, "limits", lambda: prefill_matmul.Limits(256, 0))
    check_matches_linear(prefill_matmul, n_rows, out_features, in_features, with_bias, gelu)


def test_applies_only_to_what_it_can_take():
    weight, x = torch.randn(64, 32), torch.randn(17, 32)
    with torch.inference_mode():
        assert prefill_matmul.applies(x, weight, None)
        assert prefill_matmul.applies(torch.randn(2, 32, 32), weight, None)  # batch 2 of a 32-token prompt
        assert not prefill_matmul.applies(torch.randn(16, 32), weight, None)  # the small-batch kernel's
        assert not prefill_matmul.applies(x.bfloat16(), weight.bfloat16(), None)
        assert not prefill_matmul.applies(torch.randn(17, 24), torch.randn(64, 24), None)  # width % 16 != 0
        assert not prefill_matmul.applies(x, torch.randn(32, 64).t(), None)  # not contiguous
        assert not prefill_matmul.applies(x, weight, torch.randn(64).double())
    assert not prefill_matmul.applies(x, weight.requires_grad_(), None)  # autograd keeps F.linear


@torch.inference_mode()
def test_applies_where_it_beats_onednn_on_each_instruction_set(monkeypatch):
    """The limits measured for each instruction set the kernels are built for, and for an Intel CPU with AVX-512
    (prefill_matmul's docstring)."""
    wide_input, square = torch.randn(8, 3072), torch.randn(768, 768)
    monkeypatch.setattr(build, "cpu_kind", lambda: ("AuthenticAMD", "25"))
    monkeypatch.setattr(build, "instruction_set", lambda: "AVX-512")
    assert prefill_matmul.applies(torch.randn(64, 3072), wide_input, None)
    assert not prefill_matmul.applies(torch.randn(65, 3072), wide_input, None)  # oneDNN's GEMM is faster
    assert prefill_matmul.applies(torch.randn(8, 32, 768), square, None)  # x of 256 x 768 floats
    assert not prefill_matmul.applies(torch.randn(257, 768), square, None)
    monkeypatch.setattr(build, "instruction_set", lambda: "AVX2")
    assert prefill_matmul.applies(torch.randn(1024, 3072), wide_input, None)
    assert prefill_matmul.applies(torch.randn(8, 32, 768), square, None)
    assert not prefill_matmul.applies(torch.randn(1025, 768), square, None)  # unmeasured: oneDNN's
    monkeypatch.setattr(build, "cpu_kind", lambda: ("GenuineIntel", "6"))
    assert prefill_matmul.applies(torch.randn(8, 32, 768), square, None)  # AVX2: the instruction set's limits
    monkeypatch.setattr(build, "instruction_set", lambda: "AVX-512")
    assert prefill_matmul.applies(torch.randn(64, 3072), wide_input, None)
    assert not prefill_matmul.applies(torch.randn(65, 768), square, None)  # oneDNN's GEMM near the FMA peak


@torch.inference_mode()
def test_the_model_uses_it_for_a_short_prompt(monkeypatch):
    """A batch-1 prompt of 17-64 tokens runs its matmuls on the kernel, with the same logits as oneDNN's."""
    from gpt2.bench import random_model
    from gpt2.config import GPT2Config

    model = random_model(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=500))
    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    calls = []
    matmul = prefill_matmul.matmul
    monkeypatch.setattr(prefill_matmul, "matmul", lambda *args, **kw: calls.append(1) or matmul(*args, **kw))
    got = model(ids)
    assert len(calls) == 2 * 4 + 1  # qkv, c_proj, c_fc (with gelu_new) and c_proj per block, the lm_head
    monkeypatch.setattr(prefill_matmul, "applies", lambda *args: False)
    expected = model(ids)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
