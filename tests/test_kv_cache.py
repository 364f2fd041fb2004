"""The KV cache's buffers (gpt2/kv_cache.py): zeros on every device, and on the CPU memory only where written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import gpt2
from gpt2 import GPT2Config
from gpt2.kv_cache import KVCache

CONFIG = GPT2Config(n_embd=256, n_layer=8, n_head=4, n_positions=1024, vocab_size=100)


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_new_cache_is_zeros_and_keeps_what_is_written(dtype):
    cache = KVCache(CONFIG, batch_size=3, max_len=100, device="cpu", dtype=dtype)
    assert cache.k.shape == cache.v.shape == (8, 3, 4, 100, 64) and cache.k.dtype == dtype
    assert not cache.k.any() and not cache.v.any()
    cache.k[2, 1, 3, 99] = 1.5
    cache.v[0, 0, 0, 0] = -2.0
    assert cache.k[2, 1, 3, 99].eq(1.5).all() and cache.v[0, 0, 0, 0].eq(-2.0).all()
    assert cache.k.count_nonzero() == cache.v.count_nonzero() == 64


def test_an_empty_cache_shape_is_allowed():
    cache = KVCache(CONFIG, batch_size=0, max_len=10, device="cpu", dtype=torch.float32)
    assert cache.k.numel() == 0


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="resident memory is read from Linux's /proc")
def test_a_cpu_cache_takes_memory_only_where_written():
    """A 1024-slot cache for 8 rows (128 MB here) costs no memory until written, then about the pages written: each
    row's first slot of every head and layer is one page of each (layer, row, head) buffer of k and v (where Linux
    backs all anonymous memory with 2 MiB pages, a write takes a whole one, so that part is not checked there)."""
    before = resident_bytes()
    cache = KVCache(CONFIG, batch_size=8, max_len=1024, device="cpu", dtype=torch.float32)
    size = 2 * cache.k.numel() * 4
    assert size == 128 << 20
    assert resident_bytes() - before < 8 << 20
    cache.k[:, :, :, 0] = 1.0
    cache.v[:, :, :, 0] = 1.0
    written_pages = 2 * 8 * 8 * 4 * os.sysconf("SC_PAGE_SIZE")  # k and v, layers, rows, heads
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (thp.exists() and "[always]" in thp.read_text()):
        assert resident_bytes() - before < written_pages + (8 << 20) < size / 4


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16])
def test_a_lower_precision_cache_rounds_keys_and_values_only(checkpoints, token_ids, kv_dtype):
    """gpt2.load(..., kv_dtype=...): the cache holds kv_dtype, rounding each key and value as it is written, and
    attention reads it widened to fp32. The bound: the keys and values each rounded once to kv_dtype (relative 2^-9
    bf16, 2^-12 fp16 at most) move the attention scores and outputs by about that much, so the logits move by a small
    multiple of it after the tiny model's two layers: measured 0.025% (bf16) and 0.003% (fp16) relative RMS; bounded
    at 4 x 2^-8 (bf16) and 4 x 2^-11 (fp16)."""
    exact_model = gpt2.load(checkpoints["hf-safetensors"])
    model = gpt2.load(checkpoints["hf-safetensors"], kv_dtype=kv_dtype)
    assert model.new_cache(2, 8).k.dtype == kv_dtype and exact_model.new_cache(2, 8).k.dtype == torch.float32
    prompt = 7
    with torch.inference_mode():
        results = []
        for m in (exact_model, model):
            cache = m.new_cache(2, token_ids.shape[1])
            steps = [m(token_ids[:, :prompt], cache=cache)]
            steps += [m(token_ids[:, t:t + 1], cache=cache) for t in range(prompt, token_ids.shape[1])]
            results.append(torch.cat(steps, dim=1))
    exact, rounded = results
    bound = 4 * (2**-8 if kv_dtype == torch.bfloat16 else 2**-11)
    assert 0 < ((rounded - exact).norm() / exact.norm()).item() <= bound
    assert model.generate(token_ids[:1, :5].tolist(), max_new_tokens=3, min_new_tokens=3)  # the decode loop takes it


def test_load_refuses_bad_kv_dtype_and_packed_prefill(checkpoints):
    with pytest.raises(ValueError, match="kv_dtype torch.int8 is not supported"):
        gpt2.load(checkpoints["hf-safetensors"], kv_dtype=torch.int8)
    with pytest.raises(ValueError, match="packed_prefill=True applies to dtype=torch.bfloat16 or quantize='int8'"):
        gpt2.load(checkpoints["hf-safetensors"], packed_prefill=True)
