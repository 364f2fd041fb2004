"""What else the machine is doing while a benchmark runs: other processes, the hypervisor's steal time, and this
process's resident memory (Linux /proc; neutral values where it cannot be read)."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def cpu_times() -> tuple[float, float, float]:
    """(CPU seconds all processes have been busy, CPU seconds of this process, wall clock), from Linux /proc."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0, time.monotonic()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    return busy, sum(os.times()[:4]), time.monotonic()


def steal_seconds() -> float:
    """CPU seconds the hypervisor has given this machine's cores to other guests (Linux /proc/stat "steal"; 0 where
    it cannot be read). A co-tenant VM slows every two-thread region but is not among this machine's processes."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return 0.0
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def other_cores(since: tuple[float, float, float]) -> float:
    """Average number of cores other processes kept busy since the `cpu_times()` sample `since`."""
    busy, own, now = cpu_times()
    return max(busy - since[0] - (own - since[1]), 0.0) / max(now - since[2], 1e-9)


def wait_for_quiet(max_wait_s: float = 20.0, below_cores: float = 0.25, window_s: float = 0.25) -> float:
    """Wait until other processes use fewer than below_cores over a window (at most max_wait_s); seconds waited.

    On a shared machine a co-tenant holding one of two cores stalls every two-thread parallel region
    (the worker waits for a descheduled thread), so timings taken then say little about the engine.
    """
    start = time.monotonic()
    while time.monotonic() - start < max_wait_s:
        sample = cpu_times()
        time.sleep(window_s)
        if other_cores(sample) < below_cores:
            break
    return time.monotonic() - start


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except OSError:
        return 0


def peak_rss_growth_mb(fn: Callable[[], object], interval_s: float = 0.001) -> float:
    """Peak resident memory during fn() above the level just before it, sampled every interval_s by a thread.

    Freed heap is handed back first (gc, glibc malloc_trim) so that growth is memory fn really uses
    (KV cache, activations, logits, workspaces), not memory an earlier call left cached.
    """
    gc.collect()
    _malloc_trim()
    base = peak = rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return (max(peak, rss_bytes()) - base) / 2**20


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
