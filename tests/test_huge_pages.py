"""gpt2.cpu.huge_pages: weights copied into 2 MiB-aligned fresh memory keep their values and stay usable; memory
another library allocated is collapsed into huge pages in place."""

from __future__ import annotations

import mmap

import pytest
import torch

from gpt2.cpu.huge_pages import collapse_into_huge_pages, huge_page_copy, huge_page_weights


def test_large_tensors_are_copied_aligned_and_small_ones_kept():
    big = torch.randn(1024, 768)  # 3 MiB
    copy = huge_page_copy(big)
    assert torch.equal(copy, big) and copy.data_ptr() != big.data_ptr()
    assert copy.data_ptr() % (2 << 20) == 0
    small = torch.randn(10)
    assert huge_page_copy(small) is small


def test_moved_module_computes_the_same_and_trains():
    torch.manual_seed(0)
    layer = torch.nn.Linear(768, 1024)
    x = torch.randn(3, 768)
    expected = layer(x)
    huge_page_weights(layer)
    assert layer.weight.data_ptr() % (2 << 20) == 0
    out = layer(x)
    assert torch.equal(out, expected)
    out.sum().backward()  # still ordinary parameters
    assert layer.weight.grad is not None


def huge_page_bytes_in(start: int, end: int) -> int:
    """AnonHugePages of this process's mappings that overlap [start, end), from /proc/self/smaps."""
    total, overlaps = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split()[0]
            if "-" in first and ":" not in first:  # a mapping's header: "lo-hi perms ..."
                lo, hi = (int(v, 16) for v in first.split("-"))
                overlaps = lo < end and start < hi
            elif overlaps and first == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
    return total


def test_collapse_backs_the_whole_pages_inside_a_range_with_huge_pages():
    size = 8 << 20  # at least three whole 2 MiB pages inside, wherever it starts
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    raw = torch.frombuffer(buffer, dtype=torch.uint8)
    raw.fill_(7)  # touched first, as a library's packed weights are: ordinary pages until collapsed
    address = raw.data_ptr()
    assert collapse_into_huge_pages(address + 1, 1000) == 0  # no whole page inside
    done = collapse_into_huge_pages(address, size)
    if done == 0:
        pytest.skip("this kernel cannot collapse memory into huge pages (MADV_COLLAPSE needs Linux 6.1+ and THP)")
    assert done % (2 << 20) == 0 and done >= 6 << 20
    assert huge_page_bytes_in(address, address + size) >= done
    assert bool((raw == 7).all())  # the contents are kept
    del raw
    buffer.close()
