"""The base of linear layers whose weights a CPU library keeps in its own packed, opaque layout.

oneDNN's blocked bf16 weights (`gpt2.cpu.bf16_linear`) and fbgemm's int8 weights (`gpt2.cpu.int8_linear`) can be
neither moved to another device nor cast; `model.to(...)` would leave them behind and fail later, deep
inside torch, so such a layer refuses any conversion that would change its device or dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


class CpuPackedLinear(nn.Module):
    """A linear layer with packed CPU weights, taking and returning `dtype` activations."""

    dtype: torch.dtype
    layout: str  # what the weights are, for messages

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> CpuPackedLinear:
        probe = fn(torch.empty(0, dtype=self.dtype))  # what .to() / .cuda() / .half() ... would make of a tensor
        if probe.dtype != self.dtype or probe.device.type != "cpu":
            raise ValueError(f"this model's linear layers hold {self.layout} weights, which stay on the CPU in "
                             f"{self.dtype}; load it again with gpt2.load(..., device=..., dtype=...) instead")
        return super()._apply(fn, recurse)
