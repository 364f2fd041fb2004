"""The preallocated KV cache and the per-forward bookkeeping of which positions each row reads and writes.

Cache slot == absolute position: row b's token at position p lives in slot p of every layer's buffer.
Rows of a batch may hold different numbers of tokens (`lengths`); a forward over a (B, T) chunk adds
`n_new[b] <= T` tokens to row b (the rest of the row is right padding that is neither written nor attended).
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from functools import cached_property

import torch

from .config import GPT2Config


@dataclass
class ForwardStep:
    """Where a (B, T) chunk of new tokens sits: built once per forward, shared by every layer."""

    q_start: torch.Tensor  # (B,) int32, position of each row's first new token
    kv_len: torch.Tensor  # (B,) int32, valid keys per row after this chunk
    positions: torch.Tensor  # (B, T) long, position ids (padding clamped into range)
    kv_span: int  # attention reads key slots [0, kv_span); >= max(kv_len)
    q_start_host: list[int]
    n_new_host: list[int]
    chunk_len: int  # T
    # True when the tensors above are fixed buffers refilled before each run (a CUDA-graph decode step):
    # nothing may then depend on the host positions, so no slice writes and no mask shortcuts.
    position_independent: bool = False

    @classmethod
    def build(cls, q_start: list[int], n_new: list[int], chunk_len: int, n_positions: int, device: torch.device,
              kv_span: int | None = None) -> ForwardStep:
        kv_len_host = [s + n for s, n in zip(q_start, n_new)]
        q_start_t = torch.tensor(q_start, dtype=torch.int32, device=device)
        positions = q_start_t[:, None].long() + torch.arange(chunk_len, device=device)  # (B, T)
        return cls(
            q_start=q_start_t,
            kv_len=torch.tensor(kv_len_host, dtype=torch.int32, device=device),
            positions=positions.clamp_(max=n_positions - 1),
            kv_span=max(kv_len_host) if kv_span is None else kv_span,
            q_start_host=list(q_start),
            n_new_host=list(n_new),
            chunk_len=chunk_len,
        )

    @cached_property
    def every_row_full(self) -> bool:
        """Every row adds a whole chunk of new tokens (no right padding)."""
        return all(n == self.chunk_len for n in self.n_new_host)

    @cached_property
    def dense(self) -> bool:
        """Every row starts at the same position and fills the whole chunk (no padding, no raggedness)."""
        return not self.position_independent and len(set(self.q_start_host)) == 1 and self.every_row_full

    @cached_property
    def decode_slots(self) -> torch.Tensor:
        """(B, 1, 1, 1) long: the slot each row's one new token goes to, for `KVCache.write`'s scatter."""
        return self.q_start.long().view(-1, 1, 1, 1)

    @cached_property
    def chunk_slots(self) -> torch.Tensor:
        """(B, 1, T, 1) long: the slots of each row's T new tokens, for `KVCache.write`'s scatter of whole chunks."""
        chunk = torch.arange(self.chunk_len, device=self.q_start.device)
        return (self.q_start.long()[:, None] + chunk).view(-1, 1, self.chunk_len, 1)

    @cached_property
    def last_offsets_host(self) -> list[int]:
        """Each row's last new token within the chunk (0 for a row with none)."""
        return [max(n - 1, 0) for n in self.n_new_host]

    @cached_property
    def last_offsets(self) -> torch.Tensor:
        """(B,) long: `last_offsets_host` on the device."""
        return torch.tensor(self.last_offsets_host, device=self.q_start.device)

    def last_new_token(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """x (B, ..., T, ...) cut to each row's last new token along dim, which stays with size 1."""
        if self.every_row_full:
            return x.narrow(dim, self.chunk_len - 1, 1)
        index_shape = [1] * x.dim()
        index_shape[0] = -1
        return torch.take_along_dim(x, self.last_offsets.view(index_shape), dim)

    @cached_property
    def last_tokens(self) -> ForwardStep:
        """This chunk seen from each row's last new token alone: one query per row over the same keys.

        A prefill that only needs the output at each row's last token runs its last block's attention and MLP
        on that token alone (see `GPT2.forward_step`); the keys and values it attends over are the whole chunk's.
        """
        q_start_host = [s + o for s, o in zip(self.q_start_host, self.last_offsets_host)]
        return ForwardStep(
            q_start=torch.tensor(q_start_host, dtype=torch.int32, device=self.q_start.device),
            kv_len=self.kv_len,
            positions=self.last_new_token(self.positions, 1),  # (B, 1)
            kv_span=self.kv_span,
            q_start_host=q_start_host,
            n_new_host=[min(n, 1) for n in self.n_new_host],
            chunk_len=1,
        )

    @cached_property
    def write_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, slots, chunk offsets) of the valid new tokens, each (N,), for ragged cache writes."""
        device = self.q_start.device
        B, T = len(self.n_new_host), self.chunk_len
        if self.every_row_full:  # every token valid: no data-dependent nonzero()
            rows = torch.arange(B, device=device).repeat_interleave(T)  # (B*T,)
            offsets = torch.arange(T, device=device).repeat(B)
        else:
            valid = torch.arange(T, device=device)[None, :] < torch.tensor(self.n_new_host, device=device)[:, None]
            rows, offsets = valid.nonzero(as_tuple=True)  # (B, T) mask -> (N,) each
        return rows, self.q_start.long()[rows] + offsets, offsets

    @cached_property
    def attention_mask(self) -> torch.Tensor | None:
        """(B, 1, T, kv_span) bool, True where query t of row b may attend key slot j.

        None when no mask is needed beyond plain causal: a dense chunk that ends at kv_span and either
        starts at 0 (prefill: causal over the chunk) or is one token (decode: every key is visible).
        """
        start = self.q_start_host[0]
        if self.dense and self.kv_span == start + self.chunk_len and (start == 0 or self.chunk_len == 1):
            return None
        device = self.q_start.device
        j = torch.arange(self.kv_span, device=device)  # (S,)
        q_pos = self.q_start[:, None].long() + torch.arange(self.chunk_len, device=device)  # (B, T)
        allowed = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < self.kv_len[:, None, None].long())
        return allowed[:, None]  # (B, 1, T, S)


def zeros_on_demand(shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Zeros of shape; on the CPU in fresh anonymous memory, which Linux maps to the zero page and backs with memory
    only where a page is first written, so that a cache costs time and memory for the slots it holds, not its
    length. torch.zeros writes the whole buffer, which made a short prefill into a long cache measurably slower, the
    more so the larger the cache (docs/performance.md#gpt2kv_cachepy-a-lazily-zeroed-cache). torch.zeros elsewhere."""
    n_bytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or n_bytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):
        return torch.zeros(shape, device=device, dtype=dtype)
    memory = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(memory, dtype=torch.uint8).view(dtype).view(shape)  # the tensor keeps `memory` alive


class KVCache:
    """Per-layer K and V buffers of shape (B, H, max_len, D), written in place (never concatenated)."""

    def __init__(self, config: GPT2Config, batch_size: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        if max_len > config.n_positions:
            raise ValueError(f"KV cache length {max_len} exceeds the model's n_positions ({config.n_positions})")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = zeros_on_demand(shape, device, dtype)  # (L, B, H, S, D)
        self.v = zeros_on_demand(shape, device, dtype)
        self.lengths: list[int] = [0] * batch_size  # tokens held per row
        self.n_positions = config.n_positions

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def begin(self, n_new: list[int], chunk_len: int, kv_span: int | None = None) -> ForwardStep:
        """Plan a forward that appends n_new[b] tokens to row b; call `commit` after it."""
        if len(n_new) != self.batch_size:
            raise ValueError(f"n_new has {len(n_new)} rows, the cache {self.batch_size}")
        for row, (have, n) in enumerate(zip(self.lengths, n_new)):
            if not 0 <= n <= chunk_len:
                raise ValueError(f"row {row}: n_new={n} outside [0, {chunk_len}]")
            if have + n > self.max_len:
                raise ValueError(f"row {row}: {have} cached + {n} new tokens exceed the cache length {self.max_len}")
        return ForwardStep.build(self.lengths, n_new, chunk_len, self.n_positions, self.k.device, kv_span)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: ForwardStep) -> None:
        """Store this chunk's keys and values, k/v (B, H, T, D), at each row's slots (rounded to the cache's dtype)."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if step.dense:
            start = step.q_start_host[0]
            self.k[layer, :, :, start:start + step.chunk_len] = k
            self.v[layer, :, :, start:start + step.chunk_len] = v
            return
        if step.chunk_len == 1 and step.every_row_full:
            # One token per row at its own slot (ragged or graph-captured decode): one scatter per buffer, where
            # a gather and an index_put_ took at least two kernels per buffer in the captured decode step.
            slots = step.decode_slots.expand(k.shape)  # (B, H, 1, D)
            self.k[layer].scatter_(2, slots, k)
            self.v[layer].scatter_(2, slots, v)
            return
        if step.every_row_full:
            # Each row's whole chunk at its own slots (speculative decoding's check of several tokens a row): one
            # scatter per buffer; the indexed write below stalls for milliseconds now and then on 2 busy cores.
            slots = step.chunk_slots.expand(k.shape)  # (B, H, T, D)
            self.k[layer].scatter_(2, slots, k)
            self.v[layer].scatter_(2, slots, v)
            return
        rows, slots, offsets = step.write_index
        self.k[layer][rows, :, slots] = k[rows, :, offsets]  # (N, H, D)
        self.v[layer][rows, :, slots] = v[rows, :, offsets]

    def keys_values(self, layer: int, step: ForwardStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (B, H, kv_span, D) of the layer's buffers that this step attends over."""
        return self.k[layer, :, :, :step.kv_span], self.v[layer, :, :, :step.kv_span]

    def take_rows(self, source: KVCache, rows: list[int]) -> None:
        """Row i of this cache becomes a copy of source's row rows[i] (its tokens and length): one batched copy of the
        slots source's rows hold, however long this cache is (n rows continuing one prompt share its prefill)."""
        if len(rows) != self.batch_size:
            raise ValueError(f"take_rows: {len(rows)} rows for a cache of {self.batch_size}")
        held = max(source.lengths[r] for r in rows)
        if held > self.max_len:
            raise ValueError(f"take_rows: source rows hold {held} tokens, more than this cache's {self.max_len}")
        index = torch.tensor(rows, device=self.k.device)
        self.k[:, :, :, :held] = source.k[:, index, :, :held]  # (L, len(rows), H, held, D)
        self.v[:, :, :, :held] = source.v[:, index, :, :held]
        self.lengths = [source.lengths[r] for r in rows]

    def reorder_rows(self, parents: list[int], shared: list[int] | None = None) -> None:
        """Row r becomes a copy of row parents[r] (beam search: each row takes the beam it continues). shared[r]: how
        many leading slots row r already holds the same as its parent (a common prompt and common first tokens: a
        slot's keys depend on its token and all before it), default 0. Only the rows whose parent is another row are
        copied, and only from the first slot one of them does not share to the last their parents hold."""
        shared = shared or [0] * len(parents)
        moved = [r for r, p in enumerate(parents) if p != r and shared[r] < self.lengths[p]]
        if moved:
            start, held = min(shared[r] for r in moved), max(self.lengths[parents[r]] for r in moved)
            rows = torch.tensor(moved, device=self.k.device)
            sources = torch.tensor([parents[r] for r in moved], device=self.k.device)
            self.k[:, rows, :, start:held] = self.k[:, sources, :, start:held]  # gathered (L, m, H, n, D) first
            self.v[:, rows, :, start:held] = self.v[:, sources, :, start:held]
        self.lengths = [self.lengths[p] for p in parents]

    def commit(self, step: ForwardStep) -> None:
        self.lengths = [s + n for s, n in zip(step.q_start_host, step.n_new_host)]

    def reset(self) -> None:
        self.lengths = [0] * self.batch_size
