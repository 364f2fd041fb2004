"""The one dispatch point between the model and its fused operations: plain torch, or this repo's Triton kernels.

The model calls its linear layers, LayerNorm, residual-add + LayerNorm, the MLP's bias + GELU and attention
only through a `Backend`, so kernels slot in without touching the model; on the CPU, a fp32 decode step hands the
backend all of its blocks at once (`gpt2.decode_blocks`). Chosen per device (Triton on CUDA, torch
elsewhere), overridable with `gpt2.load(..., backend=...)` or the `GPT2_BACKEND` environment variable.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_attention, decode_blocks, prefill_matmul, small_batch_matmul
from .kv_cache import ForwardStep, KVCache

if TYPE_CHECKING:
    from .model import GPT2

BACKENDS = ("torch", "triton")


# oneDNN's matmul (what torch.compile's CPU freezing pass calls) on the weight as it is, no packed copy.
# Measured on an AMD EPYC (Zen 4), 2 threads, all DialoGPT-small block linears: 1 row 14.4 ms vs 23.6 ms for
# F.linear (MKL), 8 rows 21 vs 38 ms, 32 rows 39 vs 54 ms; the lm_head at 1 row 4.7 vs 11.5 ms. Same fp32 math.
_HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """CPU fp32/bf16 inference: oneDNN has no backward, so autograd keeps F.linear."""
    return (_HAS_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and weight.dtype == x.dtype and not (torch.is_grad_enabled() and weight.requires_grad))


class TorchBackend:
    """Reference path: torch's own matmuls, LayerNorm, SDPA and tanh GELU. Runs anywhere."""

    name = "torch"

    def for_step(self, step: ForwardStep, rows: int, device: torch.device) -> TorchBackend:
        """The backend to run a forward step of `rows` tokens with: this one."""
        return self

    def decode_blocks(self, model: GPT2, x: torch.Tensor, normed: torch.Tensor, step: ForwardStep,
                      cache: KVCache | None) -> bool:
        """Every block of a CPU fp32 decode step of 1-16 rows in one C call, updating x (B, 1, C) and normed in place
        (see `gpt2.decode_blocks`); False, nothing done, where it does not apply."""
        plan = decode_blocks.plan_for(model, x, step, cache)
        if plan is None:
            return False
        decode_blocks.run(plan, model, x, normed, step, cache)
        return True

    def linear(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """x W^T + b for an nn.Linear, or the tied lm_head's nn.Embedding (no bias); other layers are called."""
        if not isinstance(layer, (nn.Linear, nn.Embedding)):
            return layer(x)  # a quantized or packed layer (gpt2.quantize, gpt2.packed_linear) computes itself
        weight, bias = layer.weight, getattr(layer, "bias", None)
        if small_batch_matmul.applies(x, weight, bias):  # 1-16 fp32 rows on the CPU: a decode step's matmul
            return small_batch_matmul.matmul(x, weight, bias)
        if prefill_matmul.applies(x, weight, bias):  # more fp32 rows on the CPU, of a size where it beats oneDNN
            return prefill_matmul.matmul(x, weight, bias)
        if _use_onednn(x, weight):
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def add_layer_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + residual
        return h, F.layer_norm(h, (h.shape[-1],), weight, bias, eps)

    def linear_gelu(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        # gelu_new(x W^T + b): the tanh approximation is GPT-2's gelu_new formula. oneDNN can fuse it into the
        # matmul, which pays from 8 rows on (DialoGPT-small c_fc at 256 rows: 6.2 ms vs 7.2 ms) but slows the
        # one-row decode GEMV (374 us vs 303 + 20 us for a separate GELU), so single rows keep it separate. 1-16 fp32
        # rows go to the small-batch kernel, which applies it to each block of outputs while they are in L1, and
        # the prefill kernel's sizes to it, which applies it to each tile of outputs. A
        # packed bf16 layer fuses it at every row count (DialoGPT-small c_fc: 206 vs 228 us at 1 row).
        if hasattr(layer, "forward_gelu"):
            return layer.forward_gelu(x)
        if isinstance(layer, nn.Linear) and small_batch_matmul.applies(x, layer.weight, layer.bias):
            return small_batch_matmul.matmul(x, layer.weight, layer.bias, gelu=True)
        if isinstance(layer, nn.Linear) and prefill_matmul.applies(x, layer.weight, layer.bias):
            return prefill_matmul.matmul(x, layer.weight, layer.bias, gelu=True)
        if x.numel() > x.shape[-1] and isinstance(layer, nn.Linear) and _use_onednn(x, layer.weight):
            return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu", [], "tanh")
        return F.gelu(self.linear(x, layer), approximate="tanh")

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: ForwardStep) -> torch.Tensor:
        # q (B, H, T, D); k, v (B, H, S, D) -> (B, H, T, D)
        if cpu_attention.applies(q, k, v, step):  # fp32 on the CPU: this engine's C kernel, SDPA's masks not needed
            return cpu_attention.attention(q, k, v, step)
        mask = step.attention_mask
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class TritonBackend(TorchBackend):
    """This repo's Triton kernels (`kernels/`); on the CPU only under TRITON_INTERPRET=1.

    On CUDA, a forward step run eagerly (not a captured decode step) of at most `eager_torch_max_rows` tokens
    runs on torch's ops instead. There the GPU waits on the host, and a Triton launch costs the host more than
    a torch one: measured on an H200 with 32-token prompts at batch 1, 8 and 32, prefill took 5.0-5.6 ms with
    the kernels and 3.4-3.7 ms with torch's ops on DialoGPT-small (fp16), 8.9-9.8 and 6.0-6.5 ms on medium,
    26-37 us more per Triton launch. Inside a captured decode step launches cost nothing and the kernels'
    device time wins (small decode step 0.72 ms against 0.85 ms on torch's ops).
    """

    name = "triton"
    EAGER_TORCH_MAX_ROWS = 1024  # the largest chunk measured (32 rows x 32 tokens); larger ones keep the kernels

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

    def decode_blocks(self, model: GPT2, x: torch.Tensor, normed: torch.Tensor, step: ForwardStep,
                      cache: KVCache | None) -> bool:
        return False  # the kernels run every op of every block

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: ForwardStep) -> torch.Tensor:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
        if q.shape[2] == 1:
            return self.kernels.attention_decode(q[:, :, 0], k, v, step.kv_len, sm_scale)[:, :, None]
        return self.kernels.attention_prefill(q, k, v, step.q_start, step.kv_len, sm_scale)


def select_backend(name: str | None, device: torch.device | str) -> TorchBackend:
    """`name` or $GPT2_BACKEND or the device's default; Triton where it cannot run is an error, not a fallback."""
    device = torch.device(device)
    name = name or os.environ.get("GPT2_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "torch":
        return TorchBackend()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        raise ValueError(
            f"backend 'triton' cannot run on device {device.type!r}: it needs a CUDA GPU, "
            "or TRITON_INTERPRET=1 set before triton is imported (slow; for tests)"
        )
    try:
        backend = TritonBackend()
    except ImportError as e:
        raise ValueError(f"backend 'triton' is unavailable: {e}") from None
    problem = None if device.type == "cuda" else backend.kernels.interpreter_problem()
    if problem:
        raise ValueError(f"backend 'triton' cannot run on device {device.type!r}: {problem}")
    return backend
