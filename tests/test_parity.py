"""Parity against the reference: `transformers.GPT2LMHeadModel` with seeded random weights, real DialoGPT shapes.

Tolerances: fp32 logits within 1e-4 max-abs of the reference (both sides compute in fp32; the
differences are accumulation-order rounding, ~1e-6 here). Greedy generation must be token-identical.
"""

from __future__ import annotations

import pytest
import torch

from gpt2 import GPT2, GPT2Config
from tests.checkpoints import engine_twin, make_reference_model

FP32_ATOL = 1e-4
TINY = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128)


@pytest.fixture(scope="module", params=["tiny", "dialogpt-small"])
def pair(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, GPT2]:
    config = TINY if request.param == "tiny" else GPT2Config.from_preset(request.param)
    reference = make_reference_model(config, seed=0)
    return reference, engine_twin(reference)


def prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def test_logits_batch_of_one(pair):
    reference, model = pair
    ids = torch.tensor(prompts([37]))
    diff = (model(ids) - reference(ids).logits).abs().max().item()
    assert diff <= FP32_ATOL


@torch.inference_mode()
def test_logits_full_batch(pair):
    reference, model = pair
    ids = torch.tensor(prompts([19, 19, 19]))
    assert (model(ids) - reference(ids).logits).abs().max().item() <= FP32_ATOL


@torch.inference_mode()
def test_ragged_batch_rows_equal_each_row_alone(pair):
    reference, model = pair
    rows = prompts([23, 1, 9, 16])
    cache = model.new_cache(len(rows), 32)
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    last = model(ids, cache=cache, n_new=[len(r) for r in rows], last_only=True)  # (B, V)
    for i, row in enumerate(rows):
        expected = reference(torch.tensor([row])).logits[0, -1]
        assert (last[i] - expected).abs().max().item() <= FP32_ATOL, f"row {i}"


@torch.inference_mode()
def test_cached_decode_equals_full_recompute(pair):
    _, model = pair
    rows = prompts([12, 5])
    steps = prompts([6, 6], seed=2)  # tokens fed one at a time after the prompts
    cache = model.new_cache(2, 20)
    width = max(map(len, rows))
    model(torch.tensor([r + [0] * (width - len(r)) for r in rows]), cache=cache, n_new=[len(r) for r in rows])
    for t in range(6):
        step_logits = model(torch.tensor([[steps[0][t]], [steps[1][t]]]), cache=cache, last_only=True)
        for i in range(2):
            full = model(torch.tensor([rows[i] + steps[i][: t + 1]]))[0, -1]
            assert (step_logits[i] - full).abs().max().item() <= FP32_ATOL, f"row {i}, step {t}"


@torch.inference_mode()
def test_chunked_prefill_continues_a_cache(pair):
    """A second multi-token chunk appended to a cached prefix (the chat path) gives full-recompute logits."""
    _, model = pair
    first, second = prompts([10, 4]), prompts([3, 8], seed=3)
    cache = model.new_cache(2, 24)
    model(torch.tensor([first[0], first[1] + [0] * 6]), cache=cache, n_new=[10, 4])
    chunk = torch.tensor([second[0] + [0] * 5, second[1]])
    logits = model(chunk, cache=cache, n_new=[3, 8])  # (B, T, V)
    for i in range(2):
        n = len(second[i])
        full = model(torch.tensor([first[i] + second[i]]))[0, -n:]
        assert (logits[i, :n] - full).abs().max().item() <= FP32_ATOL, f"row {i}"


@torch.inference_mode()
def test_last_only_chunk_caches_every_token(pair):
    """With last_only the last block attends from each row's last new token alone; its keys and values must
    still be cached for the whole chunk (the next decode step reads them). A row adding nothing is ignored."""
    _, model = pair
    first, second = prompts([10, 4, 6]), prompts([3, 0, 8], seed=3)
    cache = model.new_cache(3, 24)
    model(torch.tensor([first[0], first[1] + [0] * 6, first[2] + [0] * 4]), cache=cache, n_new=[10, 4, 6],
          last_only=True)
    chunk = torch.tensor([second[0] + [0] * 5, [0] * 8, second[2]])
    last = model(chunk, cache=cache, n_new=[3, 0, 8], last_only=True)  # (B, V)
    following = [7, 8, 9]
    step = model(torch.tensor(following)[:, None], cache=cache, last_only=True)  # (B, V)
    for i in (0, 1, 2):
        history = first[i] + second[i]
        if second[i]:
            assert (last[i] - model(torch.tensor([history]))[0, -1]).abs().max().item() <= FP32_ATOL, f"row {i}"
        full = model(torch.tensor([history + [following[i]]]))[0, -1]
        assert (step[i] - full).abs().max().item() <= FP32_ATOL, f"row {i}, next step"


def reference_greedy(reference, prompt: list[int], n: int, **kwargs) -> list[int]:
    out = reference.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=50256,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
    return out[0, len(prompt):].tolist()


def test_greedy_generation_matches_transformers(pair):
    reference, model = pair
    (prompt,) = prompts([32])
    ours = model.generate([prompt], max_new_tokens=64, eos_token_id=None)[0]
    assert len(ours) == 64
    assert ours == reference_greedy(reference, prompt, 64, eos_token_id=None)


def test_greedy_ragged_batch_matches_transformers_row_by_row(pair):
    reference, model = pair
    rows = prompts([17, 3, 30], seed=4)
    ours = model.generate(rows, max_new_tokens=24, eos_token_id=None)
    for i, row in enumerate(rows):
        assert ours[i] == reference_greedy(reference, row, 24, eos_token_id=None), f"row {i}"


def test_greedy_with_penalties_matches_transformers(pair):
    reference, model = pair
    (prompt,) = prompts([20], seed=5)
    kwargs = dict(repetition_penalty=1.3, no_repeat_ngram_size=2)
    ours = model.generate([prompt], max_new_tokens=32, eos_token_id=None, **kwargs)[0]
    assert ours == reference_greedy(reference, prompt, 32, eos_token_id=None, **kwargs)


def test_generation_stops_at_eos_and_includes_it():
    reference = make_reference_model(TINY, seed=0)
    model = engine_twin(reference)
    (prompt,) = prompts([8])
    first = model.generate([prompt], max_new_tokens=3, eos_token_id=None)[0]
    # Declare the token greedy picks second to be eos: the row must stop right after it, eos included.
    stopped = model.generate([prompt], max_new_tokens=10, eos_token_id=first[1])[0]
    assert stopped == first[: first.index(first[1]) + 1]
