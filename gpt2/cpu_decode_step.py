"""A whole CPU fp32 decode step in one C call, token ids to logits (`decode_step_f32` in csrc/decode_blocks_f32.c):
what a generate call's decode loop runs on the CPU where the C kernels apply.

`model(tokens, cache=...)` runs the blocks in one C call too (`gpt2.decode_blocks`), but around it a step costs
about 30 torch ops and Python calls: the step's position tensors, the embeddings, the first LayerNorm, the check
that the kernel's weight table still matches the model, the lm_head's dispatch. After the step's weights have
streamed through, each of them finds its data in DRAM. Measured on an AMD EPYC (Zen 5), 2 threads, batch 1,
interleaved, median of 41: the step through `model(...)` took 1.0-1.6 ms longer than its two C calls (blocks and
lm_head) alone, against a weight-streaming bound of 8-13 ms. Here the embeddings, that LayerNorm and the lm_head
run inside the C call, the weight table is checked once per generation (as the CUDA graph pool checks its
weights once per lease), and a step costs a few Python operations besides.

It applies where `decode_blocks` does (plain fp32 blocks, 1-16 rows, a contiguous fp32 cache, the kernels built,
outside autograd), on the torch backend, with the lm_head tied to wte. Each call appends one token to every row.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from . import cpu_kernels, decode_blocks
from .kv_cache import KVCache

if TYPE_CHECKING:
    from .model import GPT2


class ModelWeights(ctypes.Structure):
    """The model's parameters for a whole step (`model_weights` in the C source)."""

    _fields_ = [("wte", ctypes.c_void_p), ("wpe", ctypes.c_void_p), ("ln_1_w", ctypes.c_void_p),
                ("ln_1_b", ctypes.c_void_p), ("blocks", ctypes.c_void_p), ("n_layer", ctypes.c_long),
                ("vocab", ctypes.c_long), ("n_positions", ctypes.c_long), ("C", ctypes.c_long), ("H", ctypes.c_long),
                ("eps", ctypes.c_float)]


class CpuDecodeStep:
    """Callable tokens (B,) -> logits (B, V) for the next position of every row, appending to `cache`.

    Built by `build`, which returns None where the C step does not apply. The model's weights are read as they are
    when it is built: the step holds their storage, so a weight replaced during the generation is neither freed
    under the kernel nor used before the next generation (a weight changed in place is used at once)."""

    def __init__(self, model: GPT2, cache: KVCache, plan: decode_blocks.Plan, tensors: list[torch.Tensor]) -> None:
        """tensors: wte, wpe, the first ln_1's weight and bias, then every tensor the plan's table points to."""
        config = model.config
        self.cache = cache
        self._storages = [t.untyped_storage() for t in tensors]  # kept alive while the kernel reads them
        self._plan = plan  # its table of block weights, which `weights` points into
        self.weights = ModelWeights(*(t.data_ptr() for t in tensors[:4]), ctypes.addressof(plan.weights),
                                    config.n_layer, config.vocab_size, config.n_positions, config.n_embd,
                                    config.n_head, config.layer_norm_epsilon)
        batch = cache.batch_size
        self.slots = (ctypes.c_int * batch)()  # each row's new token's slot (= position)
        self.kv_len = (ctypes.c_int * batch)()  # each row's keys after the step: slot + 1
        self.vocab_size = config.vocab_size

    @classmethod
    def build(cls, model: GPT2, cache: KVCache) -> CpuDecodeStep | None:
        """The C decode step over cache, or None where it does not apply (see the module docstring)."""
        if model.lm_head is not None or model.backend.name != "torch":
            return None
        probe = torch.empty(cache.batch_size, 1, model.config.n_embd)  # (B, 1, C): the step's shape, for the checks
        step = cache.begin([0] * cache.batch_size, 1)
        plan = decode_blocks.plan_for(model, probe, step, cache)
        first = model.h[0].ln_1
        tensors = [model.wte.weight, model.wpe.weight, first.weight, first.bias]
        if plan is None or not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                                   and not (torch.is_grad_enabled() and t.requires_grad) for t in tensors):
            return None
        return cls(model, cache, plan, tensors + decode_blocks.block_tensors(model))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        lengths = cache.lengths
        if max(lengths) + 1 > cache.max_len:
            raise ValueError(f"KV cache full: a row holds {max(lengths)} of {cache.max_len} tokens")
        tokens = tokens.reshape(-1)
        if tokens.dtype != torch.int64 or tokens.numel() != len(lengths):
            raise ValueError(f"tokens must be {len(lengths)} int64 ids (one per row), got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        tokens = tokens.contiguous()
        self.slots[:] = lengths
        self.kv_len[:] = [n + 1 for n in lengths]
        logits = torch.empty(len(lengths), self.vocab_size)  # (B, V)
        status = cpu_kernels.library().decode_step_f32(
            ctypes.byref(self.weights), tokens.data_ptr(), len(lengths), cache.k.data_ptr(), cache.v.data_ptr(),
            cache.max_len, self.slots, self.kv_len, logits.data_ptr())
        if status == -3:
            bad = [t for t in tokens.tolist() if not 0 <= t < self.vocab_size]
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})" if bad else
                             f"a row's position {max(lengths)} is outside the model's n_positions")
        if status == -2:
            raise MemoryError("decode_step_f32: out of memory for a decode step's scratch buffers")
        if status != 0:
            raise RuntimeError(f"decode_step_f32 refused this step (status {status}); `build` should have said so")
        cache.lengths = [n + 1 for n in lengths]
        return logits
