"""Weights in 2 MiB pages on the CPU: a decode step streams every weight once, and 4 KiB pages cost TLB misses."""

from __future__ import annotations

import ctypes
import functools
import math
import mmap

import torch
import torch.nn as nn

_HUGE_PAGE = 2 << 20  # bytes: Linux's transparent huge page on x86-64
_MADV_COLLAPSE = 25  # Linux 6.1+: back a range with huge pages now (not in Python 3.11's mmap module)


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new CPU tensor of shape and dtype in fresh memory that Linux may back with 2 MiB pages (zeros until written);
    below 2 MiB, or where huge pages are off, an ordinary torch.empty.

    Streaming a weight through 4 KiB pages costs TLB misses; in 2 MiB pages the decode matmuls and the whole decode
    step measured faster (docs/performance.md#gpt2cpuhuge_pagespy-2-mib-pages).
    """
    n_bytes = math.prod(shape) * dtype.itemsize
    if n_bytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    # fresh anonymous pages (not reused heap), with room to start on a 2 MiB boundary
    memory = mmap.mmap(-1, n_bytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    with torch.inference_mode(False):  # an ordinary tensor, usable by autograd later
        raw = torch.frombuffer(memory, dtype=torch.uint8)  # keeps `memory` alive
        start = -raw.data_ptr() % _HUGE_PAGE
        # whole huge pages only: a partial one at the end would hold up to 2 MiB of unused memory
        memory.madvise(mmap.MADV_HUGEPAGE, start, n_bytes // _HUGE_PAGE * _HUGE_PAGE)
        return raw[start:start + n_bytes].view(dtype).view(shape)


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of CPU tensor t in `huge_page_empty`'s memory; t itself where that would be ordinary memory (under 2
    MiB, huge pages off) or t is not on the CPU."""
    n_bytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or n_bytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t
    with torch.inference_mode(False):
        return huge_page_empty(tuple(t.shape), t.dtype).copy_(t.detach())


def huge_page_weights(module: nn.Module) -> None:
    """Move each large CPU parameter into huge-page memory (see `huge_page_copy`): a decode step streams them."""
    with torch.no_grad():
        for param in module.parameters():
            param.data = huge_page_copy(param.data)


def collapse_into_huge_pages(address: int, n_bytes: int) -> int:
    """Back the whole 2 MiB pages inside memory [address, address + n_bytes) with huge pages now, for memory a
    library allocated (oneDNN's packed weights, `gpt2.cpu.bf16_linear`) that cannot be copied into `huge_page_copy`'s.

    Only pages entirely inside the range are touched, so no neighbouring allocation is affected. Best effort:
    returns the bytes collapsed, 0 where the kernel (before Linux 6.1) or the platform cannot. On packed bf16
    weights it made the decode step faster (docs/performance.md#gpt2cpuhuge_pagespy-2-mib-pages).
    """
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + n_bytes) // _HUGE_PAGE * _HUGE_PAGE
    madvise = libc_madvise()
    if end <= start or madvise is None or not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    if madvise(start, end - start, mmap.MADV_HUGEPAGE) != 0 or madvise(start, end - start, _MADV_COLLAPSE) != 0:
        return 0
    return end - start


@functools.cache
def libc_madvise():  # noqa: ANN201 - a ctypes function, or None
    """libc's madvise(address, length, advice) through ctypes, or None where it cannot be had."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
