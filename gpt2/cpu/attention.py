"""fp32 causal attention over the KV cache on the CPU, in C (`csrc/attention_f32.c`): prefill chunks above all, and
decode steps outside `gpt2.cpu.decode_blocks` (whose one call runs the same kernel).

torch's SDPA spends a DialoGPT prefill's attention mostly outside its arithmetic, a few MFLOP a layer. The C kernel
reads each row's queries from the qkv matmul's output and its keys and values from the cache as they lie (strided
views, no copies), and writes the heads' outputs straight into the (B, T, C) layout the output projection reads.
Each query streams its keys and values alone, so where they outgrow L1 SDPA's blocked matmuls win: measured with
AVX-512 and with AVX2, the kernel is faster for chunks whose queries read a few hundred keys or fewer and for single
queries over a long cache, slower for chunks over many keys. So a chunk of several queries takes the kernel while its
queries read at most MAX_AVERAGE_KEYS keys on average, and a single query per row (a decode step) always.

Measured: docs/performance.md#gpt2cpuattentionpy-when-the-c-attention-runs
"""

from __future__ import annotations

import torch

from ..kv_cache import ForwardStep
from . import build
from .build import AttentionStrides

ELEMENTS_MULTIPLE = 16  # head_dim: the kernel reads heads in 16-float vectors
MAX_HEAD_DIM = 256  # ATTENTION_MAX_HEAD_DIM in csrc/attention_f32.h
MAX_AVERAGE_KEYS = 256  # a chunk of several queries reading more keys each, on average, runs on SDPA (see above)


def _strides(t: torch.Tensor) -> AttentionStrides:
    return AttentionStrides(*t.stride()[:3])


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: ForwardStep) -> bool:
    """fp32 on the CPU, outside autograd, one query per row or queries reading at most MAX_AVERAGE_KEYS keys on
    average, each head's vector contiguous, keys and values alike in layout, a head_dim the kernel takes and the
    kernels built."""
    D, T = q.shape[-1], q.shape[2]
    return (q.device.type == "cpu" and (T == 1 or step.kv_span - T / 2 <= MAX_AVERAGE_KEYS)
            and q.dtype == k.dtype == v.dtype == torch.float32
            and q.stride(-1) == k.stride(-1) == 1 and k.stride() == v.stride() and k.shape == v.shape
            and D % ELEMENTS_MULTIPLE == 0 and D <= MAX_HEAD_DIM and k.shape[2] >= step.kv_span
            and step.q_start.dtype == step.kv_len.dtype == torch.int32
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and build.library() is not None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: ForwardStep) -> torch.Tensor:
    """q (B, H, T, D) over k, v (B, H, S, D) -> (B, H, T, D), a view of a (B, T, H, D) tensor: query t of row b, at
    position q_start[b] + t, attends key slots [0, min(its position + 1, kv_len[b])); one with none gets zeros."""
    B, H, T, D = q.shape
    out = torch.empty(B, T, H, D, dtype=torch.float32).transpose(1, 2)  # (B, H, T, D)
    q_start, kv_len = step.q_start.contiguous(), step.kv_len.contiguous()
    status = build.library().attention_f32(
        q.data_ptr(), _strides(q), k.data_ptr(), v.data_ptr(), _strides(k), q_start.data_ptr(), kv_len.data_ptr(),
        out.data_ptr(), _strides(out), B, H, T, k.shape[2], D)
    if status == -2:
        raise MemoryError("attention_f32: out of memory for the attention scores")
    if status != 0:
        raise RuntimeError(f"attention_f32 refused head_dim {D} (status {status}); `applies` should have said so")
    return out
