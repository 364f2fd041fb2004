"""A whole CPU decode step in one C call, token ids to logits: what a generate call's decode loop runs on the CPU where
the C kernels take the step, for fp32 models (`csrc/decode_step_f32.c`), bf16 ones
(`csrc/decode_step_bf16.c`, on CPUs with avx512_bf16) and int8 ones (`gpt2.cpu.int8_linear`; `csrc/decode_step_int8.c`, on
CPUs with avx512_vnni).

`model(tokens, cache=...)` runs an fp32 step's blocks in one C call too (`gpt2.cpu.decode_blocks`), but around it a step
costs about 30 torch ops and Python calls: the step's position tensors, the embeddings, the first LayerNorm, the check
that the kernel's weight table still matches the model, the lm_head's dispatch. After the step's weights have
streamed through, each of them finds its data in DRAM, so together they cost a noticeable fraction of the
weight-streaming bound. A bf16 or int8 step through `model(...)` runs torch's ops between its matmuls. Here the
embeddings, that LayerNorm and the lm_head run inside the C call, the weight table is checked once per generation (as
the CUDA graph pool checks its weights once per lease), and a step costs a few Python operations besides: a step and
its argmax measured faster than through `model(...)` in fp32, bf16 and int8.

It applies on the torch backend to fp32 or bf16 models whose block linears have plain weights (nn.Linear, or
`gpt2.cpu.bf16_linear`'s layers) and whose lm_head is tied to wte or has a plain weight and no bias, and to int8 models
(every block linear and the lm_head `Int8Linear`, n_embd a multiple of 64), at 1-16 rows over a contiguous cache of
the model's dtype, n_embd a multiple of 16 (32 in bf16) and head_dim a multiple of 16 up to 256, outside autograd,
where the kernels are built. Each call appends one token to every row.

The fp32 and int8 steps also run over a bf16 or fp16 cache (`gpt2.load(..., kv_dtype=...)`; fp16 where the CPU
converts it, `build.f16_cache_available`): each new key and value is rounded to the cache's dtype as it is written and
every one widened to fp32 as attention reads it, as the model's forward does with such a cache. At long context the
cache is what a step reads besides the weights, so the step over a cache of half the bytes streams less, where the
forward's torch ops would make every step slower (docs/performance.md#gpt2cpudecode_steppy-a-bf16-or-fp16-kv-cache).

Measured: docs/performance.md#gpt2cpudecode_steppy-the-whole-step-in-one-c-call
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..kv_cache import KVCache
from . import build, decode_blocks, small_batch_matmul
from .backend import CpuBackend
from .int8_linear import Int8Linear

if TYPE_CHECKING:
    from ..model import GPT2

LM_HEAD_BIAS = 5  # the lm_head's bias in a step's tensors (see `_plan`), the one that may be None; the blocks' follow
# The C step of each kind of model over each dtype of KV cache: its function in the kernels (csrc/decode_step_*.c).
KERNELS = {("fp32", torch.float32): "decode_step_f32", ("fp32", torch.bfloat16): "decode_step_f32_kv_bf16",
           ("fp32", torch.float16): "decode_step_f32_kv_f16", ("bf16", torch.bfloat16): "decode_step_bf16",
           ("int8", torch.float32): "decode_step_int8", ("int8", torch.bfloat16): "decode_step_int8_kv_bf16",
           ("int8", torch.float16): "decode_step_int8_kv_f16"}


class ModelWeights(ctypes.Structure):
    """The model's parameters for a whole step (`model_weights`, `model_weights_bf16`,
    `model_weights_int8`: csrc/decode_weights.h)."""

    _fields_ = [("wte", ctypes.c_void_p), ("wpe", ctypes.c_void_p), ("ln_1_w", ctypes.c_void_p),
                ("ln_1_b", ctypes.c_void_p), ("lm_head", ctypes.c_void_p), ("lm_head_b", ctypes.c_void_p),
                ("blocks", ctypes.c_void_p),
                ("n_layer", ctypes.c_long), ("vocab", ctypes.c_long), ("n_positions", ctypes.c_long),
                ("C", ctypes.c_long), ("H", ctypes.c_long), ("eps", ctypes.c_float)]


def lm_head_weight(model: GPT2) -> torch.Tensor | None:
    """The lm_head's plain (vocab, n_embd) weight: wte where tied; None for an lm_head with a bias or none such."""
    if model.lm_head is None:
        return model.wte.weight
    tensors = decode_blocks.linear_tensors(model.lm_head)
    return tensors[0] if tensors is not None and tensors[1] is None else None


def int8_tensors(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An int8 layer's (weight (out, in) int8, rows (out, 3)) for the int8 step (`gpt2.cpu.int8_linear.Int8Linear`), or None
    for another layer or one built where that step does not run."""
    if not isinstance(linear, Int8Linear) or linear.step_weight is None:
        return None
    return linear.step_weight, linear.step_rows


def _kernel(kind: str, cache_dtype: torch.dtype) -> ctypes._CFuncPtr | None:
    """The C step of a model of kind ("fp32", "bf16", "int8") over a cache of cache_dtype, None for none here."""
    name = KERNELS.get((kind, cache_dtype))
    if name is None or (cache_dtype == torch.float16 and not build.f16_cache_available()):
        return None
    return getattr(build.library(), name)


def _plan(model: GPT2, cache_dtype: torch.dtype
          ) -> tuple[ctypes._CFuncPtr, list[torch.Tensor | None], set[torch.dtype]] | None:
    """The C step for this model over a cache of cache_dtype where one runs here, its tensors (wte, wpe, the first
    ln_1's weight and bias, the lm_head's weight and bias, then the blocks' in `decode_blocks.BlockWeights` order) and
    the dtypes they may have."""
    first = model.h[0].ln_1
    head = [model.wte.weight, model.wpe.weight, first.weight, first.bias]
    dtype = model.dtype
    if isinstance(model.lm_head, Int8Linear):  # an int8 model (`gpt2.cpu.int8_linear`): int8 linears, fp32 otherwise
        lm_head, blocks = int8_tensors(model.lm_head), decode_blocks.block_tensors(model, int8_tensors)
        if (not build.int8_available() or model.config.n_embd % small_batch_matmul.VECTOR_BYTES  # of int8
                or lm_head is None or blocks is None):
            return None
        kernel = _kernel("int8", cache_dtype)
        return None if kernel is None else (kernel, [*head, *lm_head, *blocks], {torch.float32, torch.int8})
    if dtype == torch.float32 and build.library() is not None:
        kernel = _kernel("fp32", cache_dtype)
    elif dtype == torch.bfloat16 and build.bf16_available():
        kernel = _kernel("bf16", cache_dtype)
    else:
        return None
    blocks = decode_blocks.block_tensors(model)
    if kernel is None or blocks is None:
        return None
    return kernel, [*head, lm_head_weight(model), None, *blocks], {dtype}


class CpuDecodeStep:
    """Callable tokens (B,) -> logits (B, V) in the model's dtype for the next position of every row, appending to
    `cache`.

    Built by `build`, which returns None where the C step does not apply. The model's weights are read as they are
    when it is built: the step holds their storage, so a weight replaced during the generation is neither freed
    under the kernel nor used before the next generation (a weight changed in place is used at once)."""

    def __init__(self, model: GPT2, cache: KVCache, kernel: ctypes._CFuncPtr,
                 tensors: list[torch.Tensor | None]) -> None:
        """tensors: wte, wpe, the first ln_1's weight and bias, the lm_head's weight and bias (None for none), then
        the blocks' tensors in `decode_blocks.BlockWeights` order."""
        config = model.config
        self.cache = cache
        self.kernel = kernel
        present = [t for t in tensors if t is not None]
        self._storages = [t.untyped_storage() for t in present]  # kept alive while the kernel reads them
        pointers = [0 if t is None else t.data_ptr() for t in tensors]
        self._blocks = decode_blocks.weights_table(pointers[LM_HEAD_BIAS + 1:])
        self.weights = ModelWeights(*pointers[:LM_HEAD_BIAS + 1], ctypes.addressof(self._blocks), config.n_layer,
                                    config.vocab_size, config.n_positions, config.n_embd, config.n_head,
                                    config.layer_norm_epsilon)
        self.slots = (ctypes.c_int * cache.batch_size)()  # each row's new token's slot (= position)
        self.vocab_size = config.vocab_size
        self.dtype = model.dtype

    @classmethod
    def build(cls, model: GPT2, cache: KVCache) -> CpuDecodeStep | None:
        """The C decode step over cache, or None where it does not apply (see the module docstring)."""
        dtype, cache_dtype = model.dtype, cache.k.dtype
        if (not isinstance(model.backend, CpuBackend)
                or not decode_blocks.takes_cache(model.config, cache, dtype, cache_dtype)):
            return None
        plan = _plan(model, cache_dtype)
        if plan is None:
            return None
        kernel, tensors, dtypes = plan
        grad = torch.is_grad_enabled()
        if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype in dtypes and t.is_contiguous()
                   and not (grad and t.requires_grad)
                   for i, t in enumerate(tensors) if not (i == LM_HEAD_BIAS and t is None)):  # None: no bias
            return None
        return cls(model, cache, kernel, tensors)

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
        logits = torch.empty(len(lengths), self.vocab_size, dtype=self.dtype)  # (B, V)
        status = self.kernel(ctypes.byref(self.weights), tokens.data_ptr(), len(lengths), cache.k.data_ptr(),
                             cache.v.data_ptr(), cache.max_len, self.slots, logits.data_ptr())
        if status == -3:
            bad = [t for t in tokens.tolist() if not 0 <= t < self.vocab_size]
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})" if bad else
                             f"a row's position {max(lengths)} is outside the model's n_positions")
        if status == -2:
            raise MemoryError("the C decode step: out of memory for its scratch buffers")
        if status != 0:
            raise RuntimeError(f"the C decode step refused this step (status {status}); `build` should have said so")
        cache.lengths = [n + 1 for n in lengths]
        return logits
