"""The scheduler's KV cache: a slot (a cache row) per running choice, and the batched decode step over all of them.

The decode step is the dispatch's (`gpt2.dispatch.decode_step_for`: the CPU's one-call C step for 1-16 rows, a captured
CUDA graph on CUDA, else the forward), and it appends a token to every row of its cache. Free rows take token 0 at
position 0 (their length is reset before each step) and their logits are ignored; a slot's row is overwritten when it
is next loaded. On the CPU a step's cost grows with its rows, used or not, so the cache is resized through row
buckets (1, 2, 4, 8, ...), each time copying the rows in use: grown at once to the bucket that holds the slots about
to be needed (`reserve`), and shrunk once a bucket a quarter its size or less has held the slots in use for
SHRINK_AFTER steps in a row, so that a lone request decodes at batch 1 while a batch whose requests end and are
replaced together keeps its cache (and its memory, already paged in). Where the step is a CUDA graph, a new cache
means a new capture while a step's cost barely grows with its rows: the cache keeps max_rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..dispatch import DecodeFn, cuda_graphs_enabled, decode_step_for
from ..kv_cache import KVCache

if TYPE_CHECKING:
    from ..model import GPT2

SHRINK_AFTER = 64  # decode steps: longer than a request takes to be replaced by the next in a busy batch


def row_buckets(model: GPT2, max_rows: int) -> list[int]:
    """The cache sizes the slots move through: powers of two up to max_rows (and max_rows), or max_rows alone under
    CUDA graphs (see the module docstring)."""
    if cuda_graphs_enabled(model):
        return [max_rows]
    buckets = [1]
    while buckets[-1] * 2 < max_rows:
        buckets.append(buckets[-1] * 2)
    return buckets if buckets[-1] == max_rows else [*buckets, max_rows]


class SlotCache:
    """Slots of one KV cache of n_positions tokens a row, and its decode step; used from one thread."""

    def __init__(self, model: GPT2, max_rows: int) -> None:
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows={max_rows!r} must be a positive integer")
        self.model = model
        self.buckets = row_buckets(model, max_rows)
        self.used: list[bool] = []
        self.sparse_steps = 0  # steps in a row for which a quarter-size bucket held the slots in use
        self.cache: KVCache
        self.decode: DecodeFn
        self._resize(self.buckets[0], [])

    @property
    def rows(self) -> int:
        """Rows in the cache now, used or not: what a decode step runs."""
        return self.cache.batch_size

    @property
    def max_rows(self) -> int:
        return self.buckets[-1]

    @property
    def in_use(self) -> int:
        return sum(self.used)

    def reserve(self, more: int) -> None:
        """Grow the cache, in one copy, to the smallest bucket that holds the slots in use and `more` others."""
        needed = self.in_use + more
        if needed > self.max_rows:
            raise RuntimeError(f"{needed} slots asked for, {self.max_rows} exist")
        if needed > self.rows:
            self._resize(next(b for b in self.buckets if b >= needed), list(range(self.rows)))

    def acquire(self) -> int:
        """A free slot (the lowest), growing the cache when none is free."""
        if all(self.used):
            self.reserve(1)
        slot = self.used.index(False)
        self.used[slot] = True
        return slot

    def release(self, slot: int) -> None:
        self.used[slot] = False

    def load(self, slot: int, source: KVCache, row: int) -> None:
        """Slot's row becomes a copy of source's row `row` (the tokens it holds)."""
        held = source.lengths[row]
        self.cache.k[:, slot, :, :held] = source.k[:, row, :, :held]
        self.cache.v[:, slot, :, :held] = source.v[:, row, :, :held]
        self.cache.lengths[slot] = held

    def step(self, tokens: dict[int, int]) -> torch.Tensor:
        """Append tokens[slot] to each slot in tokens, in one decode step over every row; logits (rows, V), of which
        only the rows in tokens mean anything."""
        lengths = self.cache.lengths
        for row in range(self.rows):
            if row not in tokens:
                lengths[row] = 0
        ids = torch.zeros(self.rows, dtype=torch.long)
        ids[list(tokens)] = torch.tensor(list(tokens.values()), dtype=torch.long)
        return self.decode(ids.to(self.model.device))

    def shrink(self) -> dict[int, int]:
        """Called once a step: move the slots in use into a smaller cache once one a quarter the size or less has
        held them for SHRINK_AFTER calls in a row (see the module docstring); returns each moved slot's new slot
        (nothing when nothing moved)."""
        used = [slot for slot, busy in enumerate(self.used) if busy]
        target = next(b for b in self.buckets if b >= max(len(used), 1))
        if target >= self.rows or target > self.rows // 4:
            self.sparse_steps = 0
            return {}
        self.sparse_steps += 1
        if self.sparse_steps < SHRINK_AFTER:
            return {}
        self._resize(target, used)
        return {old: new for new, old in enumerate(used) if old != new}

    def _resize(self, rows: int, keep: list[int]) -> None:
        """A cache of rows rows whose row i is the current cache's row keep[i] (in use or not, as it was), and its
        decode step."""
        cache = self.model.new_cache(rows, self.model.config.n_positions)
        if keep:
            held = max(self.cache.lengths[r] for r in keep)
            source = slice(0, len(keep)) if keep == list(range(len(keep))) else torch.tensor(keep,
                                                                                            device=cache.k.device)
            cache.k[:, :len(keep), :, :held] = self.cache.k[:, source, :, :held]
            cache.v[:, :len(keep), :, :held] = self.cache.v[:, source, :, :held]
            cache.lengths[:len(keep)] = [self.cache.lengths[r] for r in keep]
        self.used = [self.used[keep[i]] if i < len(keep) else False for i in range(rows)]
        self.sparse_steps = 0
        self.cache = cache
        self.decode = decode_step_for(self.model, cache)
