"""A CPU fp32 decode step's blocks in one C call (gpt2/decode_blocks.py) against the same step through the model's
per-block torch ops: logits, the KV cache it writes, ragged rows, and where it must not apply.

Tolerance: 1e-5 of the logits' largest magnitude. Both paths are fp32 with the same matmul kernel; they differ in
the order of the attention's and LayerNorm's sums and in gelu_new's exp (measured: ~2e-6 of it on DialoGPT-medium).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from gpt2.bench import random_model
from gpt2.cpu import build, decode_blocks
from gpt2.config import GPT2Config

pytestmark = pytest.mark.skipif(build.unavailable_reason() is not None,
                                reason=f"C kernels unavailable: {build.unavailable_reason()}")

CONFIGS = {  # head_dim 16, 48 and 64 (GPT-2's): one, three and four vectors per head
    "64x4": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=500),
    "96x2": GPT2Config(n_embd=96, n_layer=3, n_head=2, n_positions=128, vocab_size=500),
    "128x2": GPT2Config(n_embd=128, n_layer=2, n_head=2, n_positions=128, vocab_size=500),
}


def model_for(name: str) -> torch.nn.Module:
    """A random model whose LayerNorms are random too, so that each one's place in the kernel matters."""
    model = random_model(CONFIGS[name], seed=len(name))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if ".ln_" in param_name or param_name.startswith("ln_f"):
                param.copy_(torch.randn_like(param) * 0.5 + (1.0 if param_name.endswith("weight") else 0.0))
    return model


def decode(model, prompts: list[list[int]], steps: list[list[int]], fused: bool, monkeypatch) -> tuple:
    """Prefill the prompts (ragged), then one decode forward per entry of steps (n_new of each row, 0 or 1);
    returns (logits of every decode step, the cache)."""
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(decode_blocks, "plan_for", lambda *args: None)
        calls = []
        run = decode_blocks.run
        patch.setattr(decode_blocks, "run", lambda *args: calls.append(1) or run(*args))
        generator = torch.Generator().manual_seed(3)
        cache = model.new_cache(len(prompts), 96)
        width = max(map(len, prompts))
        ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
        with torch.inference_mode():
            model(ids, cache=cache, n_new=[len(p) for p in prompts])
            logits = []
            for n_new in steps:
                tokens = torch.randint(0, model.config.vocab_size, (len(prompts), 1), generator=generator)
                logits.append(model(tokens, cache=cache, n_new=n_new, last_only=True))
        assert len(calls) == (len(steps) if fused else 0)
        return torch.stack(logits), cache


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("lengths", [[5], [3, 17, 1], [9, 2, 30, 16, 1, 7, 4, 33],  # batch 1, 3, 8 and 13
                                     [4, 8, 15, 16, 23, 42, 1, 2, 3, 5, 8, 13, 21]])
def test_matches_the_per_block_path(config, lengths, monkeypatch):
    """Ragged prompts, then 20 decode steps: keys past 16 (a whole vector of scores) and past 32, every row."""
    model = model_for(config)
    prompts = [[(7 * i + j) % 500 for j in range(n)] for i, n in enumerate(lengths)]
    steps = [[1] * len(lengths)] * 20
    fused, fused_cache = decode(model, prompts, steps, True, monkeypatch)
    torch_ops, torch_cache = decode(model, prompts, steps, False, monkeypatch)
    assert_close(fused, torch_ops)
    assert fused_cache.lengths == torch_cache.lengths
    assert_close(fused_cache.k, torch_cache.k)
    assert_close(fused_cache.v, torch_cache.v)


def test_rows_that_add_nothing_keep_their_cache(monkeypatch):
    """A ragged decode step (a row with n_new 0) writes nothing to that row; the other rows match the torch path."""
    model = model_for("64x4")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    steps = [[1, 0, 1], [0, 1, 1], [1, 1, 0]]
    fused, fused_cache = decode(model, prompts, steps, True, monkeypatch)
    torch_ops, torch_cache = decode(model, prompts, steps, False, monkeypatch)
    for step, n_new in enumerate(steps):
        rows = [row for row, n in enumerate(n_new) if n]
        assert_close(fused[step, rows], torch_ops[step, rows])
    assert fused_cache.lengths == torch_cache.lengths == [5, 7, 3]
    for row, length in enumerate(fused_cache.lengths):
        assert_close(fused_cache.k[:, row, :, :length], torch_cache.k[:, row, :, :length])
        assert fused_cache.k[:, row, :, length:].abs().max() == 0  # nothing written past what the row holds


def test_greedy_generation_is_unchanged(monkeypatch):
    model = model_for("96x2")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    fused = model.generate(prompts, max_new_tokens=12, eos_token_id=None)
    with monkeypatch.context() as patch:
        patch.setattr(decode_blocks, "plan_for", lambda *args: None)
        assert model.generate(prompts, max_new_tokens=12, eos_token_id=None) == fused


def test_applies_only_where_it_can():
    model = model_for("64x4")
    cache = model.new_cache(17, 16)
    one_row, many_rows = torch.zeros(1, 1, 64), torch.zeros(17, 1, 64)
    decode_step = cache.begin([1] * 17, 1)
    with torch.inference_mode():
        small = model.new_cache(1, 16)
        assert decode_blocks.plan_for(model, one_row, small.begin([1], 1), small) is not None
        assert decode_blocks.plan_for(model, many_rows, decode_step, cache) is None  # 17 rows: oneDNN's GEMMs
        assert decode_blocks.plan_for(model, one_row, small.begin([1], 1), None) is None  # no cache
        prefill = small.begin([2], 2)  # a chunk of two tokens
        assert decode_blocks.plan_for(model, torch.zeros(1, 2, 64), prefill, small) is None
        assert decode_blocks.plan_for(model, one_row.bfloat16(), small.begin([1], 1), small) is None
    model.train().requires_grad_()  # autograd needs torch's ops
    assert decode_blocks.plan_for(model, one_row, small.begin([1], 1), small) is None
    for n_embd, n_head in [(40, 5), (272, 1)]:  # head_dim 8 (not whole vectors), 272 (past MAX_HEAD_DIM)
        odd = random_model(GPT2Config(n_embd=n_embd, n_layer=1, n_head=n_head, n_positions=32, vocab_size=50))
        with torch.inference_mode():
            odd_cache = odd.new_cache(1, 8)
            assert decode_blocks.plan_for(odd, torch.zeros(1, 1, n_embd), odd_cache.begin([1], 1), odd_cache) is None


def test_a_quantized_block_keeps_the_torch_path():
    from gpt2.cpu.int8_linear import int8_available, quantize_int8

    if not int8_available():
        pytest.skip("no int8 kernels in this torch")
    model = quantize_int8(model_for("64x4"))
    cache = model.new_cache(1, 16)
    with torch.inference_mode():
        assert decode_blocks.plan_for(model, torch.zeros(1, 1, 64), cache.begin([1], 1), cache) is None


@pytest.mark.parametrize("how", ["new parameter", "new data", "in place"])
def test_a_changed_weight_is_used(how, monkeypatch):
    """The kernel's weight table is kept per model: replacing a parameter, or its data, rebuilds it."""
    model = model_for("64x4")
    prompts, steps = [[1, 2, 3]], [[1]] * 2
    before, _ = decode(model, prompts, steps, True, monkeypatch)
    fc = model.h[1].mlp.c_fc
    changed = torch.randn_like(fc.weight) * 0.05
    with torch.no_grad():
        if how == "new parameter":
            fc.weight = torch.nn.Parameter(changed)
        elif how == "new data":
            fc.weight.data = changed
        else:
            fc.weight.copy_(changed)
    fused, _ = decode(model, prompts, steps, True, monkeypatch)
    torch_ops, _ = decode(model, prompts, steps, False, monkeypatch)
    assert (fused - before).abs().max() > 1e-3  # the step saw the change
    assert_close(fused, torch_ops)


def test_the_weight_table_keeps_no_weight_alive(monkeypatch):
    """A replaced weight is freed: the per-model table holds pointers, not tensors (a quantized or cast model's
    fp32 weights would otherwise stay in memory)."""
    model = model_for("64x4")
    decode(model, [[1, 2, 3]], [[1]], True, monkeypatch)  # builds the table
    fc = model.h[0].mlp.c_fc
    old = weakref.ref(fc.weight)
    fc.weight = torch.nn.Parameter(fc.weight.detach().clone())
    gc.collect()
    assert old() is None


def test_a_cache_of_another_shape_is_refused():
    model = model_for("64x4")
    other = random_model(GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=128, vocab_size=500))
    cache = other.new_cache(1, 16)  # one layer more than the model has
    with torch.inference_mode():
        assert decode_blocks.plan_for(model, torch.zeros(1, 1, 64), cache.begin([1], 1), cache) is None
