"""Letting go of the pages a checkpoint file has mapped into this process, once a tensor read from them is copied.

safetensors and `torch.load(mmap=True)` read a weights file as one private (copy-on-write) mapping of the whole file,
the tensors views into it. Every page read stays resident, counted in this process's memory, for as long as the
mapping lives, which is as long as any view of the file does: a load that copies each tensor out of the file would
otherwise hold the whole file beside the model (docs/performance.md#gpt2memorypy-what-a-loaded-model-costs).
`FileMapping.release(t)` drops t's pages with madvise(MADV_DONTNEED): they stay in the page cache, and a view that
reads them again gets the file's bytes back (nothing writes to a checkpoint's tensors). Only pages inside a private
mapping of that very file are touched, so a tensor that lives in anonymous memory (a file read without mmap, a
transposed copy) is never discarded.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

from .cpu.huge_pages import libc_madvise

_PAGE = mmap.PAGESIZE


class FileMapping:
    """The private mappings of one file in this process, as /proc/self/maps lists them when this is made."""

    def __init__(self, path: str | Path) -> None:
        self.ranges = _private_mappings(Path(path))

    def release(self, t: torch.Tensor) -> None:
        """Drop the resident pages of t's bytes that lie inside this file's mappings (best effort: nothing where
        madvise or /proc cannot be used)."""
        madvise = libc_madvise()
        if madvise is None or not hasattr(mmap, "MADV_DONTNEED") or t.device.type != "cpu" or t.layout != torch.strided or t.numel() == 0:
            return
        start = t.data_ptr() // _PAGE * _PAGE  # whole pages: one shared with a neighbour is read again if needed
        end = -(-(t.data_ptr() + _byte_span(t)) // _PAGE) * _PAGE
        for low, high in self.ranges:
            low, high = max(low, start), min(high, end)
            if low < high:
                madvise(low, high - low, mmap.MADV_DONTNEED)


def _byte_span(t: torch.Tensor) -> int:
    """Bytes from t's first element to just past its last (t may be a strided view, a transpose say)."""
    return (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()


def _private_mappings(path: Path) -> list[tuple[int, int]]:
    """(start, end) of each private mapping of path in this process; none where /proc/self/maps cannot be read."""
    try:
        target, inode = os.path.realpath(path), os.stat(path).st_ino
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1][3] == "p" and int(fields[4]) == inode and fields[5].rstrip("\n") == target:
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges
