"""A whole decode step on the fused decode kernels, for the Triton backend's captured decode step: opt in with
GPT2_FUSED_DECODE=1 (off by default until a GPU run has validated and timed it:
docs/performance.md#gpu-the-fused-decode-step).

Per layer it launches five kernels where the unfused step launches eleven (QKV matmul, two cache scatters, two
attention kernels, out-projection, add + LayerNorm, c_fc, bias + GELU, c_proj, add + LayerNorm):
  ln_1 + QKV + bias + KV-cache append (kernels/qkv_append.py),
  decode attention's split kernel, then merge + out-projection + bias + residual add (kernels/attention_residual.py),
  ln_2 + c_fc + bias + gelu_new (kernels/ln_linear.py),
  c_proj + bias + residual add (kernels/linear_residual.py);
and around them the embedding (kernels/embedding.py) and ln_f + lm_head (kernels/ln_linear.py): 5 * n_layer + 2.
The residual stream stays in fp32 for the whole step (the projections add into it atomically), where the unfused
step rounds it to the model's dtype at every add; each LayerNorm is recomputed in the prologue of the matvec it feeds.

`StaticDecodeStep` runs it in place of the model's forward: on CUDA it is captured in the step's graph; off CUDA
(tests, under TRITON_INTERPRET=1) it runs eagerly, the same kernel sequence on CPU tensors.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..kv_cache import KVCache

if TYPE_CHECKING:
    from ..model import GPT2

FUSED_DECODE_ENV = "GPT2_FUSED_DECODE"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_decode_requested() -> bool:
    """Whether GPT2_FUSED_DECODE asks for the fused step: "1" does; unset or "0" does not. To make it the default on
    CUDA once a GPU run confirms it, read an unset variable as "1" here (and say so in the docs)."""
    return os.environ.get(FUSED_DECODE_ENV, "0") == "1"


def unsupported(model: GPT2, cache: KVCache) -> str | None:
    """Why the fused step cannot run model's decode over cache, or None when it can."""
    if model.backend.name != "triton":
        return f"the {model.backend.name} backend (the fused step is the Triton backend's)"
    if model.dtype not in DTYPES:
        return f"a {model.dtype} model (fp32, fp16 or bf16 only)"
    if cache.k.dtype != model.dtype:
        return f"a {cache.k.dtype} KV cache for a {model.dtype} model (kv_dtype)"
    D = model.config.head_dim
    if D < 16 or D > 128 or D & (D - 1):
        return f"head_dim {D} (a power of two in [16, 128] only)"
    linears = [layer for block in model.h for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                                                         block.mlp.c_proj)]
    if any(type(layer) is not nn.Linear or layer.bias is None for layer in linears):
        return "a block linear that is not a plain nn.Linear with a bias"
    if model.lm_head is not None and type(model.lm_head) is not nn.Linear:
        return "an lm_head that is not a plain nn.Linear"
    return None


class FusedDecode:
    """Callable (tokens, positions, slots, kv_len), each (B,), -> logits (B, V): one decode step over cache that
    writes each row's key and value at slots[b] and attends over its first kv_len[b] slots. It reads the model's
    weights at each call, so it never holds stale ones."""

    def __init__(self, model: GPT2, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.kernels = model.backend.kernels  # gpt2_kernels.ops, imported by the Triton backend

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 kv_len: torch.Tensor) -> torch.Tensor:
        model, ops = self.model, self.kernels
        B, H, D = tokens.shape[0], model.config.n_head, model.config.head_dim
        sm_scale = 1.0 / math.sqrt(D)
        residual = ops.embedding(tokens, positions, model.wte.weight, model.wpe.weight)  # (B, C) fp32
        for i, block in enumerate(model.h):
            attn, mlp = block.attn, block.mlp
            k_cache, v_cache = self.cache.k[i], self.cache.v[i]  # (B, H, S, D)
            q = ops.ln_qkv_append(residual, block.ln_1.weight, block.ln_1.bias, attn.c_attn.weight, attn.c_attn.bias,
                                  k_cache, v_cache, slots, block.ln_1.eps)  # (B, C)
            ops.attention_residual(q.view(B, H, D), k_cache, v_cache, kv_len, sm_scale, attn.c_proj.weight,
                                   attn.c_proj.bias, residual)
            hidden = ops.ln_linear(residual, block.ln_2.weight, block.ln_2.bias, mlp.c_fc.weight, mlp.c_fc.bias,
                                   block.ln_2.eps, gelu=True)  # (B, 4C)
            ops.linear_residual(hidden, mlp.c_proj.weight, mlp.c_proj.bias, residual)
        head = model.wte if model.lm_head is None else model.lm_head
        return ops.ln_linear(residual, model.ln_f.weight, model.ln_f.bias, head.weight, getattr(head, "bias", None),
                             model.ln_f.eps)


def fused_decode_for(model: GPT2, cache: KVCache) -> FusedDecode | None:
    """The fused step over cache where GPT2_FUSED_DECODE asks for it and it can run (`unsupported`), else None: the
    decode step then runs the model's forward, as without the switch."""
    if not fused_decode_requested() or unsupported(model, cache) is not None:
        return None
    return FusedDecode(model, cache)
