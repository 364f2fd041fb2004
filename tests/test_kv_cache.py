"""The KV cache's buffers (gpt2/kv_cache.py): zeros on every device, and on the CPU memory only where written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
