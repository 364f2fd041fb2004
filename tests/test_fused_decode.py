"""The fused decode step (`gpt2.cuda.fused_decode`, opt in with GPT2_FUSED_DECODE=1) against the torch backend's.

On the CPU the static decode step runs it eagerly under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU), on a tiny model whose caches are prefilled by the torch backend and copied, so only
the decode steps run interpreted; on a CUDA machine the step is captured in a CUDA graph and replayed. Tolerances:
fp32 logits within 1e-4 of the torch backend's, as the parity suite (the fused step keeps its residual stream in fp32
and sums in another order); fp16 and bf16 logits no further from the fp32 torch backend's than 2x the torch backend's
own in that dtype (plus 1e-3), the kernel tests' rule (tests/kernel_tolerances.py) applied to the whole step.
"""

from __future__ import annotations

import pytest
import torch

from gpt2 import GPT2, GPT2Config
from gpt2.cuda.decode_graph import StaticDecodeStep
from gpt2.cuda.fused_decode import FUSED_DECODE_ENV, FusedDecode, fused_decode_for, unsupported
from gpt2.decoding import prefill
from gpt2.dispatch import decode_one_token, graph_pool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_ATOL = 1e-4
CONFIG = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=300)
ROWS = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]]


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT2(CONFIG, backend="torch")
    with torch.no_grad():
        for p in model.parameters():  # GPT-2-like scales so every op matters
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
    return model.state_dict()


def _model(weights: dict[str, torch.Tensor], backend: str, dtype: torch.dtype) -> GPT2:
    model = GPT2(CONFIG, backend=backend)
    model.load_state_dict(weights)
    return model.to(DEVICE, dtype).eval()


def _tokens(step: int, batch: int) -> torch.Tensor:
    return torch.tensor([11 + step, 40, 200 - step, 3][:batch], device=DEVICE)


def _torch_backend_steps(weights, dtype: torch.dtype, rows: list[list[int]], steps: int) -> list[torch.Tensor]:
    """The torch backend's logits at each decode step after prefilling rows."""
    model = _model(weights, "torch", dtype)
    cache = model.new_cache(len(rows), 20)
    prefill(model, cache, rows)
    return [decode_one_token(model, cache, _tokens(i, len(rows))) for i in range(steps)]


def _decode_pair(weights, dtype: torch.dtype, rows: list[list[int]], steps: int, monkeypatch
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(fused logits, torch backend logits) of each decode step after the same prefill, both in dtype."""
    monkeypatch.setenv(FUSED_DECODE_ENV, "1")
    reference, fused_model = _model(weights, "torch", dtype), _model(weights, "triton", dtype)
    reference_cache, fused_cache = reference.new_cache(len(rows), 20), fused_model.new_cache(len(rows), 20)
    prefill(reference, reference_cache, rows)
    for name in ("k", "v"):  # the prefill is not what is tested: copy it rather than run it interpreted
        getattr(fused_cache, name).copy_(getattr(reference_cache, name))
    fused_cache.lengths = list(reference_cache.lengths)
    step = StaticDecodeStep(fused_model, fused_cache, use_graph=DEVICE == "cuda")
    assert isinstance(step.fused, FusedDecode)
    pairs = []
    for i in range(steps):
        tokens = _tokens(i, len(rows))
        pairs.append((step(tokens), decode_one_token(reference, reference_cache, tokens)))
        assert fused_cache.lengths == reference_cache.lengths
    for name in ("k", "v"):  # every key and value the steps appended, at each row's own slot
        ours, theirs = getattr(fused_cache, name).float(), getattr(reference_cache, name).float()
        assert (ours - theirs).abs().max().item() <= (FP32_ATOL if dtype == torch.float32 else 0.05), name
    return pairs


@pytest.mark.parametrize("rows, steps", [(ROWS, 3), (ROWS[:1], 2)], ids=["batch3", "batch1"])
@torch.inference_mode()
def test_fused_step_matches_torch_backend_fp32(weights, rows, steps, monkeypatch):
    for i, (fused, reference) in enumerate(_decode_pair(weights, torch.float32, rows, steps, monkeypatch)):
        assert (fused - reference).abs().max().item() <= FP32_ATOL, f"step {i}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@torch.inference_mode()
def test_fused_step_low_precision_error_within_torch_backends(weights, dtype, monkeypatch):
    exact = _torch_backend_steps(weights, torch.float32, ROWS, 1)
    for i, (fused, reference) in enumerate(_decode_pair(weights, dtype, ROWS, 1, monkeypatch)):
        ours = (fused.float() - exact[i]).abs().max().item()
        theirs = (reference.float() - exact[i]).abs().max().item()
        assert ours <= 2 * theirs + 1e-3, f"step {i}: {ours:.3g} vs the torch backend's {theirs:.3g}"


def test_the_fused_step_is_opt_in_and_declines_what_it_cannot_run(weights, monkeypatch):
    model = _model(weights, "triton", torch.float32)
    cache = model.new_cache(2, 8)
    monkeypatch.delenv(FUSED_DECODE_ENV, raising=False)
    assert fused_decode_for(model, cache) is None  # off by default
    monkeypatch.setenv(FUSED_DECODE_ENV, "1")
    assert isinstance(fused_decode_for(model, cache), FusedDecode)
    assert "torch backend" in unsupported(_model(weights, "torch", torch.float32), cache)
    assert "KV cache" in unsupported(model, cache.__class__(CONFIG, 2, 8, DEVICE, torch.float16))
    model.h[1].mlp.c_fc = torch.nn.Sequential(model.h[1].mlp.c_fc)  # stands for a packed or quantized layer
    assert "plain nn.Linear" in unsupported(model, cache)
    assert fused_decode_for(model, cache) is None


@torch.inference_mode()
def test_generation_through_the_pool_with_the_fused_step_matches_the_torch_backend(weights, monkeypatch):
    """Greedy tokens through the pooled static step (fused) equal the torch backend's plain decode loop; switching
    GPT2_FUSED_DECODE empties the pool, so no step built for the other setting is reused."""
    prompts, kwargs = [[1, 2, 3, 4, 5, 6], [7]], dict(max_new_tokens=3, eos_token_id=None)
    expected = _model(weights, "torch", torch.float32).generate(prompts, **kwargs)
    model = _model(weights, "triton", torch.float32)
    if DEVICE == "cpu":
        monkeypatch.setattr("gpt2.dispatch.cuda_graphs_enabled", lambda model: True)
    monkeypatch.setenv(FUSED_DECODE_ENV, "0")
    with graph_pool(model).lease(model, 2, 16) as (_, step):
        assert step.fused is None
    monkeypatch.setenv(FUSED_DECODE_ENV, "1")
    assert model.generate(prompts, **kwargs) == expected
    with graph_pool(model).lease(model, 2, 16) as (_, step):
        assert isinstance(step.fused, FusedDecode)
