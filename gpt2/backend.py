"""The operations the model runs through a backend, and `TorchBackend`, their plain-torch reference.

The model calls its linear layers, LayerNorm, residual-add + LayerNorm, the MLP's bias + GELU and attention only
through a backend, so kernels slot in without touching the model: the CPU wing's `CpuBackend` (this engine's C
kernels and oneDNN) and the CUDA wing's `TritonBackend` (this repo's Triton kernels) subclass this one.
`gpt2.dispatch.select_backend` picks one per device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kv_cache import ForwardStep, KVCache

if TYPE_CHECKING:
    from .model import GPT2


class TorchBackend:
    """Reference path: torch's own matmuls, LayerNorm, SDPA and tanh GELU. Runs anywhere."""

    name = "torch"

    def rows_at_step_cost(self) -> int | None:
        """How many token rows a forward takes at about a one-row decode step's cost, the weights streaming once for
        all of them (how many tokens speculative decoding checks at once); None where no such limit is known."""
        return None

    def for_step(self, step: ForwardStep, rows: int, device: torch.device) -> TorchBackend:
        """The backend to run a forward step of `rows` tokens with: this one."""
        return self

    def decode_blocks(self, model: GPT2, x: torch.Tensor, normed: torch.Tensor, step: ForwardStep,
                      cache: KVCache | None) -> bool:
        """Run every block of a decode step at once, updating x (B, 1, C) and normed in place, where a backend can;
        False, nothing done, where it cannot (here: always; the model then runs its blocks one by one)."""
        return False

    def linear(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """x W^T + b for an nn.Linear, or the tied lm_head's nn.Embedding (no bias); other layers are called."""
        if not isinstance(layer, (nn.Linear, nn.Embedding)):
            return layer(x)  # a quantized or packed layer (gpt2.cpu.int8_linear, gpt2.cpu.bf16_linear) computes itself
        return F.linear(x, layer.weight, getattr(layer, "bias", None))

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def add_layer_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + residual
        return h, F.layer_norm(h, (h.shape[-1],), weight, bias, eps)

    def linear_gelu(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """gelu_new(x W^T + b): the tanh approximation is GPT-2's gelu_new formula."""
        if hasattr(layer, "forward_gelu"):  # a packed layer fuses it
            return layer.forward_gelu(x)
        return F.gelu(self.linear(x, layer), approximate="tanh")

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: ForwardStep) -> torch.Tensor:
        # q (B, H, T, D); k, v (B, H, S, D) -> (B, H, T, D)
        mask = step.attention_mask
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
