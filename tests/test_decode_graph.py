"""The static decode step (the CUDA-graph path) gives the same logits as the ordinary cached decode.

On the CPU it runs eagerly over its fixed buffers (attention over the whole cache, masked by each
row's length), which checks everything but the capture; on a CUDA machine the graph is captured and
replayed too. Tolerance: fp32 1e-4 on logits, as the parity suite.
"""

from __future__ import annotations

import pytest
import torch

from gpt2 import GPT2, GPT2Config
from gpt2.cuda.decode_graph import StaticDecodeStep
from gpt2.dispatch import decode_one_token, graph_pool
from gpt2.decoding import prefill

FP32_ATOL = 1e-4
CONFIG = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=300)
# Triton runs on the CPU only under the interpreter, which tests/conftest.py turns on only without a GPU.
DEVICE_BACKENDS = ([("cpu", "torch"), ("cpu", "triton")] if not torch.cuda.is_available()
                   else [("cpu", "torch"), ("cuda", "torch"), ("cuda", "triton")])


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@torch.inference_mode()
def test_static_decode_matches_dynamic_decode(device, backend):
    torch.manual_seed(0)
    model = GPT2(CONFIG, backend=backend).to(device).eval()
    rows = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]]
    caches = [model.new_cache(3, 20) for _ in range(2)]
    for cache in caches:
        prefill(model, cache, rows)
    static = StaticDecodeStep(model, caches[1], use_graph=device == "cuda")
    for step in range(5):
        tokens = torch.tensor([11 + step, 40, 200 - step], device=device)
        expected = decode_one_token(model, caches[0], tokens)
        got = static(tokens)
        assert (got - expected).abs().max().item() <= FP32_ATOL, f"step {step}"
        assert caches[1].lengths == caches[0].lengths


def test_static_decode_refuses_a_full_cache():
    model = GPT2(CONFIG).eval()
    cache = model.new_cache(1, 4)
    prefill(model, cache, [[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="KV cache full"):
        StaticDecodeStep(model, cache, use_graph=False)(torch.tensor([5]))


def test_pool_lends_one_cache_and_step_per_shape():
    model = GPT2(CONFIG).eval()
    pool = graph_pool(model)
    with pool.lease(model, 2, 20) as (cache, step):
        assert cache.max_len == CONFIG.n_positions  # 20 rounded up to the bucket, capped at n_positions
        cache.lengths = [5, 3]
        with pool.lease(model, 2, 20) as (other, _):  # lent out: a concurrent call gets its own
            assert other is not cache
    with pool.lease(model, 2, 64) as (again, again_step):
        assert again is cache and again_step is step and again.lengths == [0, 0]  # reset for the new call
    for batch in range(3, 3 + pool.MAX_ENTRIES):
        with pool.lease(model, batch, 10):
            pass
    assert len(pool) == pool.MAX_ENTRIES
    with pool.lease(model, 2, 20) as (evicted, _):
        assert evicted is not cache  # the least recently used went first
    model.double()  # new weight tensors: the captured steps read the old ones
    with pool.lease(model, 3, 10):
        assert len(pool) == 0
    assert len(pool) == 1


@pytest.mark.parametrize("device, backend", [dc for dc in DEVICE_BACKENDS if dc != ("cpu", "triton")])
def test_generation_through_the_pool_matches_plain_decoding(device, backend, monkeypatch):
    """Greedy tokens of calls that reuse one pooled cache (holding the previous call's keys past each row's
    length) equal those of the plain decode loop. On the CPU the pool is forced on and its steps run eagerly."""
    torch.manual_seed(0)
    model = GPT2(CONFIG, backend=backend).to(device).eval()
    calls = [[[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]], [[11, 12], [13, 14, 15], [16]], [[17, 18, 19, 20], [21], [22]]]
    monkeypatch.setenv("GPT2_CUDA_GRAPHS", "0")
    expected = [model.generate(prompts, max_new_tokens=8, eos_token_id=None) for prompts in calls]
    monkeypatch.setenv("GPT2_CUDA_GRAPHS", "1")
    if device == "cpu":
        monkeypatch.setattr("gpt2.dispatch.cuda_graphs_enabled", lambda model: True)
    assert [model.generate(prompts, max_new_tokens=8, eos_token_id=None) for prompts in calls] == expected
    assert len(graph_pool(model)) == 1  # one shape: one cache and step served every call


def test_pool_keeps_its_caches_within_a_byte_budget():
    model = GPT2(CONFIG).eval()
    pool = graph_pool(model)
    caches = {}
    for batch in (1, 2):
        with pool.lease(model, batch, 20) as (cache, _):
            caches[batch] = cache
    row_bytes = caches[1].k.nbytes + caches[1].v.nbytes  # one row of a cache
    pool.MAX_BYTES = 5 * row_bytes  # this pool only
    with pool.lease(model, 3, 20):
        pass  # 1 + 2 + 3 rows exceed 5: the least recently used (1 row) goes
    with pool.lease(model, 2, 20) as (cache, _):
        assert cache is caches[2]
    with pool.lease(model, 1, 20) as (cache, _):
        assert cache is not caches[1]
    with pool.lease(model, 6, 20):
        pass  # over the budget alone: it is kept, and only it
    assert len(pool) == 1
