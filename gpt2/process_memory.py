"""This process's memory as Linux reports it: resident memory by kind and its peak (/proc/self/status; the peak can be
started over, /proc/self/clear_refs) and the pages a file keeps mapped (/proc/self/smaps); and two settings of glibc's
allocator: handing the memory it holds freed back to the system (malloc_trim), and keeping buffers for reuse. Where these cannot be read (another OS, another C library) the figures read 0 and trimming does
nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

MB = 2**20


@dataclass(frozen=True)
class ProcessMemory:
    """This process's resident memory now, in MB: all of it, its peak so far, anonymous (heap, tensors) and
    file-backed (code, mapped files) pages."""

    rss: float
    peak: float
    anon: float
    file: float


def process_memory() -> ProcessMemory:
    """Read from /proc/self/status (zeros where it cannot be read)."""
    fields = {"VmRSS": 0.0, "VmHWM": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    fields[key] = int(value.split()[0]) / 1024  # kB
    except OSError:
        pass
    return ProcessMemory(fields["VmRSS"], fields["VmHWM"], fields["RssAnon"], fields["RssFile"])


def reset_peak() -> None:
    """Start this process's peak RSS (VmHWM) over from its RSS now (Linux 4.0+; nothing elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):  # not glibc
        return None
    return libc


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
_DEFAULT_THRESHOLD = 128 << 10  # glibc's mmap and trim thresholds before it raises them


def return_freed_buffers() -> None:
    """Have glibc map each buffer over 128 KiB on its own and unmap it when freed (its behaviour until a program frees
    a large buffer, which raises the threshold), where glibc is the allocator: a load's staging buffers (int8
    quantization's, a few MB each) go back to the system at once instead of piling up in the heap between the small
    tensors it keeps (docs/performance.md#gpt2memorypy-what-a-loaded-model-costs)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)


def reuse_freed_buffers() -> None:
    """Have glibc serve allocations under 32 MiB from its heap and keep up to 64 MiB freed at its top, where glibc
    is the allocator: where it would get to by itself once a program has freed a 32 MiB buffer (its dynamic mmap
    threshold). Until then, each buffer over 128 KiB is mapped afresh and unmapped when freed, so every op of a
    forward pays page faults for its output; with this, a forward's activations reuse the memory the last one freed
    (docs/performance.md#gpt2memorypy-what-a-loaded-model-costs)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)


def trim_allocator() -> None:
    """Hand glibc's freed heap memory back to the system (malloc_trim), where glibc is the allocator."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def mapped_file_mb(path: str | Path) -> float:
    """Resident pages of this process's mappings of the file at path, in MB (/proc/self/smaps)."""
    target = os.path.realpath(path)
    total, current = 0, None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                fields = line.split()
                if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
                    current = fields[5] if len(fields) > 5 else None
                elif fields and fields[0] == "Rss:" and current == target:
                    total += int(fields[1])
    except OSError:
        return 0.0
    return total / 1024
