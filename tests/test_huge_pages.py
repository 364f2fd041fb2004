"""gpt2.huge_pages: weights copied into 2 MiB-aligned fresh memory keep their values and stay usable."""

from __future__ import annotations

import torch

from gpt2.huge_pages import huge_page_copy, huge_page_weights


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
