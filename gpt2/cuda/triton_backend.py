"""`TritonBackend`: the model's operations on this repo's Triton kernels (`kernels/`, imported as `gpt2_kernels`)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backend import TorchBackend
from ..kv_cache import ForwardStep


class TritonBackend(TorchBackend):
    """LayerNorm, bias + GELU and attention on the Triton kernels; on the CPU only under TRITON_INTERPRET=1.

    On CUDA, a forward step run eagerly (not a captured decode step) of at most `eager_torch_max_rows` tokens runs on
    torch's ops instead: there the GPU waits on the host, and a Triton launch costs the host more than a torch one.
    Inside a captured decode step launches cost nothing and the kernels win. Measured:
    docs/performance.md#gpt2cpubackendpy-and-gpt2cudatriton_backendpy-backend-choices
    """

    name = "triton"
    EAGER_TORCH_MAX_ROWS = 1024  # the largest eager chunk measured; larger ones keep the kernels

    def __init__(self) -> None:
        # Imported when this backend is chosen: decorating the kernels reads TRITON_INTERPRET, which a CPU caller
        # sets only when it wants them interpreted.
        from gpt2_kernels import ops

        self.kernels = ops
        self.eager_torch_max_rows = self.EAGER_TORCH_MAX_ROWS
        self._torch = TorchBackend()

    def for_step(self, step: ForwardStep, rows: int, device: torch.device) -> TorchBackend:
        """Torch's ops for a small eager step on CUDA (see the class docstring), else the kernels."""
        small_eager = not step.position_independent and rows <= self.eager_torch_max_rows
        return self._torch if device.type == "cuda" and small_eager else self

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        return self.kernels.layer_norm(x, weight, bias, eps)

    def add_layer_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.add_layer_norm(x, residual, weight, bias, eps)

    def linear(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        return F.linear(x, layer.weight, getattr(layer, "bias", None))

    def linear_gelu(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        return self.kernels.bias_gelu(F.linear(x, layer.weight), layer.bias)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: ForwardStep) -> torch.Tensor:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
        if q.shape[2] == 1:
            return self.kernels.attention_decode(q[:, :, 0], k, v, step.kv_len, sm_scale)[:, :, None]
        return self.kernels.attention_prefill(q, k, v, step.q_start, step.kv_len, sm_scale)
