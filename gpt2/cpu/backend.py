"""`CpuBackend`: torch's ops on the CPU, with this engine's C kernels and oneDNN's matmul wherever they apply.

The one place the model's CPU operations meet the C kernels: 1-16 fp32 rows go to the small-batch matmul, more rows
of the sizes where it wins to the prefill matmul, fp32 attention to the C attention kernel, a decode step's blocks to
one C call (`decode_blocks`); other fp32 and bf16 matmuls to oneDNN, the rest to `TorchBackend`. Why each choice:
each module's docstring, and for oneDNN's matmul and fused GELU
docs/performance.md#gpt2cpubackendpy-and-gpt2cudatriton_backendpy-backend-choices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..backend import TorchBackend
from ..kv_cache import ForwardStep, KVCache
from . import attention, build, decode_blocks, prefill_matmul, small_batch_matmul

if TYPE_CHECKING:
    from ..model import GPT2

# oneDNN's matmul on the weight as it lies (what torch.compile's CPU freezing pass calls): faster than F.linear's MKL.
_HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """CPU fp32/bf16 inference: oneDNN has no backward, so autograd keeps F.linear."""
    return (_HAS_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and weight.dtype == x.dtype and not (torch.is_grad_enabled() and weight.requires_grad))


class CpuBackend(TorchBackend):
    """Chosen by the name "torch" on a CPU: the same operations, on the fastest CPU implementation that applies."""

    def decode_blocks(self, model: GPT2, x: torch.Tensor, normed: torch.Tensor, step: ForwardStep,
                      cache: KVCache | None) -> bool:
        """Every block of an fp32 decode step of 1-16 rows in one C call (see `gpt2.cpu.decode_blocks`)."""
        plan = decode_blocks.plan_for(model, x, step, cache)
        if plan is None:
            return False
        decode_blocks.run(plan, model, x, normed, step, cache)
        return True

    def rows_at_step_cost(self) -> int | None:
        """Up to 16 fp32 rows go through the small-batch matmul, which streams each weight once for all of them
        (`gpt2.cpu.small_batch_matmul`); beyond, the matmuls grow with the rows."""
        return small_batch_matmul.MAX_ROWS if build.library() is not None else None

    def linear(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        if isinstance(layer, (nn.Linear, nn.Embedding)):
            weight, bias = layer.weight, getattr(layer, "bias", None)
            if small_batch_matmul.applies(x, weight, bias):  # 1-16 fp32 rows: a decode step's matmul
                return small_batch_matmul.matmul(x, weight, bias)
            if prefill_matmul.applies(x, weight, bias):  # more fp32 rows, of a size where it beats oneDNN
                return prefill_matmul.matmul(x, weight, bias)
            if _use_onednn(x, weight):
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return super().linear(x, layer)

    def linear_gelu(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        # The C kernels apply gelu_new to each block of outputs while it is in L1. oneDNN's fused GELU pays from
        # several rows on but slows a one-row GEMV, so one row keeps it separate.
        if isinstance(layer, nn.Linear):
            weight, bias = layer.weight, layer.bias
            if small_batch_matmul.applies(x, weight, bias):
                return small_batch_matmul.matmul(x, weight, bias, gelu=True)
            if prefill_matmul.applies(x, weight, bias):
                return prefill_matmul.matmul(x, weight, bias, gelu=True)
            if x.numel() > x.shape[-1] and _use_onednn(x, weight):
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")
        return super().linear_gelu(x, layer)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: ForwardStep) -> torch.Tensor:
        if attention.applies(q, k, v, step):  # fp32: this engine's C kernel, no mask needed
            return attention.attention(q, k, v, step)
        return super().attention(q, k, v, step)
