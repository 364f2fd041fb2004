"""A decode step with static shapes, captured once in a CUDA graph and replayed for every new token, and the
pool that keeps captured steps, with their caches, from one generate or chat call to the next.

Decode steps differ only in tensor values (each row's new token and position) when attention reads
the whole preallocated cache and masks by each row's length. `StaticDecodeStep` keeps those inputs in
fixed buffers, so on CUDA the step's ~15 kernel launches per layer are replayed from a graph instead of
issued from Python. Off CUDA it runs the same static step eagerly, which is how the CPU tests check it.
With GPT2_FUSED_DECODE=1 the step runs the fused decode kernels (`gpt2.cuda.fused_decode`) instead of the model's
forward, where they can run.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ..kv_cache import ForwardStep, KVCache
from .fused_decode import fused_decode_for, fused_decode_requested

if TYPE_CHECKING:
    from ..model import GPT2


def cuda_graphs_enabled(model: GPT2) -> bool:
    """Graphs on CUDA unless GPT2_CUDA_GRAPHS=0."""
    return model.device.type == "cuda" and os.environ.get("GPT2_CUDA_GRAPHS", "1") != "0"


class StaticDecodeStep:
    """Callable tokens (B,) -> logits (B, V) for the next position of every row, appending to `cache`."""

    def __init__(self, model: GPT2, cache: KVCache, use_graph: bool) -> None:
        self.model = model
        self.cache = cache
        self.use_graph = use_graph
        batch, device = cache.batch_size, cache.k.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1)
        self.q_start = torch.zeros(batch, dtype=torch.int32, device=device)  # (B,)
        self.kv_len = torch.ones(batch, dtype=torch.int32, device=device)  # (B,)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output buffer
        self.fused = fused_decode_for(model, cache)  # None: the model's forward runs the step

    def _step(self) -> ForwardStep:
        batch = self.cache.batch_size
        return ForwardStep(q_start=self.q_start, kv_len=self.kv_len, positions=self.positions,
                           kv_span=self.cache.max_len, q_start_host=list(self.cache.lengths),
                           n_new_host=[1] * batch, chunk_len=1, position_independent=True)

    def _run(self, step: ForwardStep) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(self.tokens[:, 0], self.positions[:, 0], self.q_start, self.kv_len)
        return self.model.forward_step(self.tokens, step, self.cache, last_only=True)

    def _capture(self) -> None:
        # A fresh ForwardStep for each run: its cached write indices and mask must be computed by ops
        # that the graph records, not reused from a warm-up run.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles kernels, settles the allocator
            for _ in range(2):
                self._run(self._step())  # writes this step's K/V at its own slots: repeating it is harmless
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run(self._step())

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        lengths = self.cache.lengths
        if max(lengths) + 1 > self.cache.max_len:
            raise ValueError(f"KV cache full: a row holds {max(lengths)} of {self.cache.max_len} tokens")
        host = torch.tensor(lengths, dtype=torch.int32)
        self.tokens.copy_(tokens.view(-1, 1))
        self.q_start.copy_(host)
        self.kv_len.copy_(host + 1)
        self.positions.copy_(host.view(-1, 1).clamp(max=self.cache.n_positions - 1))
        if not self.use_graph:
            logits = self._run(self._step())
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits.clone()
        self.cache.lengths = [n + 1 for n in lengths]
        return logits


class DecodeGraphPool:
    """KV caches with their captured decode steps, reused by every generate and chat call of the same shape.

    Capturing a step costs two eager warm-up steps and the capture itself, as long as many replayed steps, so
    reusing the graph across calls makes a short generate's decode much faster (measured:
    docs/performance.md#gpt2cudadecode_graphpy-the-graph-pool). A graph reads and writes its cache's buffers,
    so the pool keeps the caches too: one per (batch size, cache length rounded up to LENGTH_BUCKET), the
    most recently used, at most MAX_ENTRIES of them and MAX_BYTES of caches (beyond the one just used). A
    cache is lent to one call at a time (a concurrent call of the same shape gets a new one). Moving or
    casting the model's weights, changing its backend or GPT2_FUSED_DECODE empties the pool; `clear()` frees it.
    """

    LENGTH_BUCKET = 128
    MAX_ENTRIES = 4
    MAX_BYTES = 4 * 2**30  # DialoGPT-medium fp16 at batch 32 and 1024 positions holds 3.2 GB of keys and values

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[int, int], tuple[KVCache, StaticDecodeStep]] = OrderedDict()
        self._weights: tuple = ()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Free every pooled cache and graph."""
        with self._lock:
            self._entries.clear()

    @contextmanager
    def lease(self, model: GPT2, batch_size: int, max_len: int) -> Iterator[tuple[KVCache, StaticDecodeStep]]:
        """An empty cache of batch_size rows holding at least max_len tokens, and the decode step over it."""
        length = min(-(-max_len // self.LENGTH_BUCKET) * self.LENGTH_BUCKET, model.config.n_positions)
        key = (batch_size, max(length, max_len))
        weights = (model.backend.name, fused_decode_requested(), *(p.data_ptr() for p in model.parameters()))
        with self._lock:
            if weights != self._weights:
                self._entries.clear()
                self._weights = weights
            entry = self._entries.pop(key, None)  # out of the pool while lent
        if entry is None:
            cache = model.new_cache(batch_size, key[1])
            entry = (cache, StaticDecodeStep(model, cache, use_graph=model.device.type == "cuda"))
        entry[0].reset()
        try:
            yield entry
        finally:
            with self._lock:
                if weights == self._weights:
                    self._entries[key] = entry  # the most recently used last
                    while len(self._entries) > 1 and (len(self._entries) > self.MAX_ENTRIES
                                                      or self._cache_bytes() > self.MAX_BYTES):
                        self._entries.popitem(last=False)

    def _cache_bytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes for c, _ in self._entries.values())
