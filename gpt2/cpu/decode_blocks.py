"""A CPU fp32 decode step's transformer blocks in one C call (`csrc/decode_blocks_f32.c`), not ~25 torch ops each.

After each weight matrix streams through, this CPU's caches hold nothing else: the next torch op finds its code,
its tensors' metadata and the interpreter's objects in DRAM, and costs several times what it costs warm, so the ops
between a decode step's matmuls take a sizeable share of the step. The C kernel runs the same block
(`gpt2.model.Block`) with the weights streamed by the small-batch matmul (`csrc/small_batch_matmul_f32.c`), gelu_new
fused into c_fc, each row's new key and value written to its cache slot and attended in the same pass. What is left
outside it (the embeddings, the lm_head's dispatch and the Python around them) is why a generation's decode loop runs
the whole step, embeddings to logits, in one call instead (`gpt2.cpu.decode_step`); this call serves the model's
forward.

It takes plain fp32 `nn.Linear` blocks (not quantized or packed) with a contiguous KV cache, 1-16 rows of one
token each, outside autograd, where the C kernels are built (`gpt2.cpu.build`). The kernel's table of weight
pointers is kept per model and rebuilt when a parameter is replaced or moved.

Measured: docs/performance.md#gpt2cpudecode_blockspy-the-blocks-in-one-c-call
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..kv_cache import ForwardStep, KVCache
from . import attention, build, small_batch_matmul

if TYPE_CHECKING:
    from ..config import GPT2Config
    from ..model import GPT2

MAX_ROWS = small_batch_matmul.MAX_ROWS  # each block's matmuls run on the small-batch kernel
ELEMENTS_MULTIPLE = 16  # head_dim: the kernels read heads in 16-element vectors
MAX_HEAD_DIM = attention.MAX_HEAD_DIM  # each block's attention runs on that kernel


class BlockWeights(ctypes.Structure):
    """One block's parameters for the kernel (`block_weights` in the C source), each a data pointer."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "attn_w", "attn_b", "attn_proj_w", "attn_proj_b", "ln_2_w", "ln_2_b",
        "fc_w", "fc_b", "mlp_proj_w", "mlp_proj_b", "next_ln_w", "next_ln_b")]


@dataclass
class Plan:
    """The kernel's weight table for one model, with the tensors' ids and data pointers it was built from.

    It holds no tensor: each step checks the table against the model's tensors of that moment, so a replaced
    weight is never used from the table, and never kept alive by it."""

    ids: list[int]
    pointers: list[int]
    weights: ctypes.Array


_plans: weakref.WeakKeyDictionary[GPT2, Plan] = weakref.WeakKeyDictionary()


def linear_tensors(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (out, in), bias or None) of a plain nn.Linear, or of a layer that keeps its plain weight beside a packed
    one (`gpt2.cpu.bf16_linear.PackedLinear`); None for other layers (int8: `gpt2.cpu.int8_linear`)."""
    if type(linear) is nn.Linear:
        return linear._parameters["weight"], linear._parameters["bias"]
    weight = getattr(linear, "plain_weight", None)
    return None if weight is None else (weight, linear._buffers.get("bias"))


def block_tensors(model: GPT2, tensors_of: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None] | None]
                  = linear_tensors) -> list[torch.Tensor | None] | None:
    """Every block's tensors in `BlockWeights` order (next_ln: the next block's ln_1, or ln_f after the last), each
    linear's as `tensors_of` gives them (by default `linear_tensors`: its plain weight and bias), or None where it
    gives None for one.

    Read from the modules' dicts, not through nn.Module's attribute lookups, which cost a noticeable share of a
    decode step (docs/performance.md#gpt2cpudecode_blockspy-the-blocks-in-one-c-call)."""
    blocks = list(model.h._modules.values())
    tensors: list[torch.Tensor | None] = []
    for i, block in enumerate(blocks):
        attn, mlp = block._modules["attn"]._modules, block._modules["mlp"]._modules
        next_norm = blocks[i + 1]._modules["ln_1"] if i + 1 < len(blocks) else model._modules["ln_f"]
        linears = [tensors_of(linear) for linear in (attn["c_attn"], attn["c_proj"], mlp["c_fc"], mlp["c_proj"])]
        if None in linears:
            return None
        norms = [(norm._parameters["weight"], norm._parameters["bias"]) for norm in (block._modules["ln_2"], next_norm)]
        for pair in (linears[0], linears[1], norms[0], linears[2], linears[3], norms[1]):
            tensors += pair
    return tensors


def weights_table(pointers: list[int]) -> ctypes.Array:
    """The kernel's table of block weights (`BlockWeights` per block) from their data pointers in that order."""
    per_block = len(BlockWeights._fields_)
    return (BlockWeights * (len(pointers) // per_block))(*(BlockWeights(*pointers[i:i + per_block])
                                                           for i in range(0, len(pointers), per_block)))


def _weights_plan(model: GPT2) -> Plan | None:
    """The model's plan, rebuilt when any block tensor was replaced or moved; None where a tensor is missing, not
    contiguous fp32, or needs autograd."""
    tensors = block_tensors(model)
    if tensors is None or any(t is None for t in tensors):
        _plans.pop(model, None)
        return None
    ids, pointers = [id(t) for t in tensors], [t.data_ptr() for t in tensors]
    plan = _plans.get(model)
    if plan is None or plan.pointers != pointers or plan.ids != ids:
        _plans.pop(model, None)
        if not all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
            return None
        plan = _plans[model] = Plan(ids, pointers, weights_table(pointers))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return plan


def takes_cache(config: GPT2Config, cache: KVCache, dtype: torch.dtype, cache_dtype: torch.dtype | None = None) -> bool:
    """What the C decode steps of a model of dtype take (this module's and `gpt2.cpu.decode_step`'s): a contiguous cache
    of cache_dtype (by default dtype) in config's shape, of 1-16 rows, n_embd in whole 64-byte vectors of dtype,
    head_dim a multiple of 16 up to 256."""
    shape = (config.n_layer, cache.batch_size, config.n_head, cache.max_len, config.head_dim)
    cache_dtype = cache_dtype or dtype
    return (1 <= cache.batch_size <= MAX_ROWS
            and config.n_embd * dtype.itemsize % small_batch_matmul.VECTOR_BYTES == 0
            and config.head_dim % ELEMENTS_MULTIPLE == 0 and config.head_dim <= MAX_HEAD_DIM
            and all(t.shape == shape and t.dtype == cache_dtype and t.is_contiguous() for t in (cache.k, cache.v)))


def plan_for(model: GPT2, x: torch.Tensor, step: ForwardStep, cache: KVCache | None) -> Plan | None:
    """The plan to run this step with, or None where the kernel does not apply: x (B, 1, C) must be a decode step of
    every row of a cache the kernel takes (`takes_cache`), on the CPU in fp32, with the kernels built and the blocks
    plain fp32."""
    if not (cache is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and step.chunk_len == 1 and x.shape[0] == cache.batch_size
            and takes_cache(model.config, cache, torch.float32)
            and step.q_start.dtype == step.kv_len.dtype == torch.int32
            and build.library() is not None):
        return None
    return _weights_plan(model)


def run(plan: Plan, model: GPT2, x: torch.Tensor, normed: torch.Tensor, step: ForwardStep, cache: KVCache) -> None:
    """Every block over x (B, 1, C), the residual stream, and normed = h[0].ln_1(x), both contiguous and updated in
    place: x to the last block's output, normed to ln_f of it. Writes each row's new key and value to the cache."""
    config = model.config
    status = build.library().decode_blocks_f32(
        plan.weights, len(model.h), x.data_ptr(), normed.data_ptr(), x.shape[0], config.n_embd, config.n_head,
        cache.k.data_ptr(), cache.v.data_ptr(), cache.max_len, step.q_start.data_ptr(), step.kv_len.data_ptr(),
        config.layer_norm_epsilon)
    if status == -2:
        raise MemoryError("decode_blocks_f32: out of memory for a decode step's scratch buffers")
    if status != 0:
        raise RuntimeError(f"decode_blocks_f32 refused B={x.shape[0]}, n_embd={config.n_embd}, "
                           f"n_head={config.n_head} (status {status}); `plan_for` should have said so")
