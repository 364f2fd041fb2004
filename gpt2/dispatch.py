"""The one place that chooses how the model runs: its backend, per device, and how a decode step runs, per device
and dtype (a CUDA graph replayed on CUDA, the CPU wing's one C call where it takes the step, else the forward).

Names: "torch" (torch's ops; on the CPU with this engine's C kernels wherever they apply, `gpt2.cpu.backend`) and
"triton" (this repo's Triton kernels, `gpt2.cuda.triton_backend`); the default is triton on CUDA, torch elsewhere,
overridable with `gpt2.load(..., backend=...)` or $GPT2_BACKEND. Asking for Triton where it cannot run is an error,
not a fallback.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import torch

from .backend import TorchBackend
from .cpu.backend import CpuBackend
from .cpu.decode_step import CpuDecodeStep
from .cuda.decode_graph import DecodeGraphPool, StaticDecodeStep, cuda_graphs_enabled
from .cuda.triton_backend import TritonBackend
from .kv_cache import KVCache

if TYPE_CHECKING:
    from .model import GPT2

BACKENDS = ("torch", "triton")
DecodeFn = Callable[[torch.Tensor], torch.Tensor]  # tokens (B,) -> logits (B, V), appending to a cache

# Each model's captured CUDA-graph decode steps, reused across its generate and chat calls; gone with the model.
_graph_pools: weakref.WeakKeyDictionary[GPT2, DecodeGraphPool] = weakref.WeakKeyDictionary()


def select_backend(name: str | None, device: torch.device | str) -> TorchBackend:
    """`name` or $GPT2_BACKEND or the device's default (see the module docstring)."""
    device = torch.device(device)
    name = name or os.environ.get("GPT2_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "torch":
        return CpuBackend() if device.type == "cpu" else TorchBackend()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        raise ValueError(
            f"backend 'triton' cannot run on device {device.type!r}: it needs a CUDA GPU, "
            "or TRITON_INTERPRET=1 set before triton is imported (slow; for tests)"
        )
    try:
        backend = TritonBackend()
    except ImportError as e:
        raise ValueError(f"backend 'triton' is unavailable: {e}") from None
    problem = None if device.type == "cuda" else backend.kernels.interpreter_problem()
    if problem:
        raise ValueError(f"backend 'triton' cannot run on device {device.type!r}: {problem}")
    return backend


def decode_one_token(model: GPT2, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """The decode step through the model's forward: tokens (B,) -> logits (B, V) for the next position of every row."""
    return model(tokens[:, None], cache=cache, last_only=True)


def decode_step_for(model: GPT2, cache: KVCache) -> DecodeFn:
    """The decode step over cache: replayed from a CUDA graph captured for it on CUDA, one C call where the CPU's
    kernels take the whole step (`gpt2.cpu.decode_step`), else the model's forward."""
    if cuda_graphs_enabled(model):
        return StaticDecodeStep(model, cache, use_graph=True)
    return CpuDecodeStep.build(model, cache) or partial(decode_one_token, model, cache)


def graph_pool(model: GPT2) -> DecodeGraphPool:
    """The model's pool of captured decode steps and their caches (see `gpt2.cuda.decode_graph.DecodeGraphPool`)."""
    pool = _graph_pools.get(model)
    if pool is None:
        pool = _graph_pools[model] = DecodeGraphPool()
    return pool


@contextmanager
def generation_cache(model: GPT2, batch_size: int, max_len: int) -> Iterator[tuple[KVCache, DecodeFn]]:
    """An empty cache for one generation and its decode step: on CUDA a pooled cache whose captured graph is
    reused from earlier calls of the same shape (`graph_pool`), else a new cache."""
    if cuda_graphs_enabled(model):
        with graph_pool(model).lease(model, batch_size, max_len) as (cache, step):
            yield cache, step
    else:
        cache = model.new_cache(batch_size, max_len)
        yield cache, decode_step_for(model, cache)
