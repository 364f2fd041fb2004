"""The whole model on the Triton backend against the torch backend: prefill, ragged batch, cached decode.

On the CPU the kernels run under TRITON_INTERPRET=1 (set before triton is imported), so the model is
small; on a CUDA machine the same tests run natively. Tolerance: fp32 1e-4 max-abs on logits, as the
parity suite (both paths accumulate in fp32; differences are summation order).
"""

from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gpt2 import GPT2, GPT2Config  # noqa: E402
from gpt2.kv_cache import ForwardStep  # noqa: E402

FP32_ATOL = 1e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=512)


@pytest.fixture(scope="module")
def models() -> tuple[GPT2, GPT2]:
    torch.manual_seed(0)
    reference = GPT2(CONFIG, backend="torch").to(DEVICE).eval()
    with torch.no_grad():
        for p in reference.parameters():  # GPT-2-like scales so every op matters
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
    triton_model = GPT2(CONFIG, backend="triton").to(DEVICE).eval()
    triton_model.load_state_dict(reference.state_dict())
    triton_model.backend.eager_torch_max_rows = 0  # on CUDA, small eager steps would otherwise run torch's ops
    return reference, triton_model


def test_triton_backend_is_in_use(models):
    assert models[1].backend.name == "triton"


@torch.inference_mode()
def test_full_forward_matches_torch(models):
    reference, triton_model = models
    ids = torch.randint(0, CONFIG.vocab_size, (2, 33), device=DEVICE)
    assert (triton_model(ids) - reference(ids)).abs().max().item() <= FP32_ATOL


@torch.inference_mode()
def test_ragged_prefill_and_cached_decode_match_torch(models):
    reference, triton_model = models
    rows = [[5, 9, 100, 7, 3, 8, 2], [11], [40, 41, 42, 43]]
    n_new = [len(r) for r in rows]
    ids = torch.tensor([r + [0] * (7 - len(r)) for r in rows], device=DEVICE)
    caches = [m.new_cache(3, 16) for m in models]
    outs = [m(ids, cache=c, n_new=n_new, last_only=True) for m, c in zip(models, caches)]
    assert (outs[0] - outs[1]).abs().max().item() <= FP32_ATOL
    for step in range(3):
        tokens = torch.tensor([[17 + step], [200], [3 * step]], device=DEVICE)
        outs = [m(tokens, cache=c, last_only=True) for m, c in zip(models, caches)]
        assert (outs[0] - outs[1]).abs().max().item() <= FP32_ATOL, f"decode step {step}"


def test_greedy_generation_matches_torch(models):
    reference, triton_model = models
    prompts = [[1, 2, 3, 4, 5], [300, 301]]
    kwargs = dict(max_new_tokens=6, eos_token_id=None)
    assert triton_model.generate(prompts, **kwargs) == reference.generate(prompts, **kwargs)


def test_small_eager_steps_on_cuda_run_torch_ops():
    """The Triton backend hands a small eager step on CUDA to torch's ops; captured steps, large chunks and the
    interpreter (the CPU) keep the kernels. Checked on step descriptions alone, so it runs without a GPU."""
    from gpt2.cuda.triton_backend import TritonBackend

    backend = TritonBackend()
    eager = ForwardStep.build([0, 0], [16, 16], 16, CONFIG.n_positions, "cpu")
    captured = dataclasses.replace(eager, position_independent=True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert backend.for_step(eager, 32, cuda).name == "torch"
    assert backend.for_step(eager, backend.EAGER_TORCH_MAX_ROWS + 1, cuda) is backend
    assert backend.for_step(captured, 32, cuda) is backend
    assert backend.for_step(eager, 32, cpu) is backend


def test_triton_where_it_cannot_run_is_an_error(monkeypatch):
    from gpt2.dispatch import select_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="cannot run on device 'cpu'"):
        select_backend("triton", "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend("cuda-magic", "cpu")


def test_triton_on_an_interpreter_that_cannot_run_the_kernels_is_an_error(monkeypatch):
    """Triton < 3.7 with numpy >= 2.4 fails inside the kernels' loops; the backend says so up front."""
    from types import SimpleNamespace

    from gpt2.dispatch import select_backend
    from gpt2_kernels import interpreter

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(interpreter, "_numpy_refuses_int_of_array", lambda: True)
    monkeypatch.setattr(interpreter, "triton", SimpleNamespace(__version__="3.6.0"))
    with pytest.raises(ValueError, match=r"cannot run on device 'cpu': the Triton 3\.6\.0 interpreter .*triton>=3\.7"):
        select_backend("triton", "cpu")
    monkeypatch.setattr(interpreter, "triton", SimpleNamespace(__version__="3.7.0+git1234"))
    assert interpreter.interpreter_problem() is None
    monkeypatch.setattr(interpreter, "triton", SimpleNamespace(__version__="3.6.0"))
    monkeypatch.setattr(interpreter, "_numpy_refuses_int_of_array", lambda: False)
    assert interpreter.interpreter_problem() is None
