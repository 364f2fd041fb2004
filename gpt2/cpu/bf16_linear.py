"""bf16 linear layers on the CPU, each weight held once, in the plain (out, in) layout; with packed_prefill, a second
copy in oneDNN's blocked layout for the prefills.

Calls of 1-16 rows (decode steps) go to this engine's bf16 kernel (`gpt2.cpu.small_batch_matmul.matmul_bf16`) on the
plain weight, where the kernels are built and the CPU has avx512_bf16: there it is faster than oneDNN on either
layout. A generation's decode steps run on the plain weights in one C call per step (`gpt2.cpu.decode_step`), not
through these layers. Longer calls (prefills) go to oneDNN's bf16 matmul (avx512_bf16 dot products or AMX, fp32
accumulation), which reads a weight fastest in the blocked layout it picks for a batch size: the one for 8 rows
(`PACKED_FOR_ROWS`) measured fastest at every row count measured. On the plain weight oneDNN reorders it on every
call, so a prefill's matmuls take longer there, and a packed copy takes as much memory again. One copy is the default:
`gpt2.load(..., packed_prefill=True)` keeps the packed one too, for a faster prefill at twice the weights' memory (both
measured in docs/performance.md). Where the bf16 kernel does not run, the packed copy is kept regardless: there it is
the faster layout at every row count. The lm_head's plain weight is wte itself (tied), shared with the lookup.
`pack_bf16` is applied by `gpt2.load(..., dtype=torch.bfloat16)` on CPUs where oneDNN runs bf16 natively.

Measured: docs/performance.md#gpt2cpubf16_linearpy-the-packed-bf16-layout
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import build, small_batch_matmul
from .huge_pages import collapse_into_huge_pages, huge_page_copy
from .packed import CpuPackedLinear

if TYPE_CHECKING:
    from ..model import GPT2

PACKED_FOR_ROWS = 8  # the batch size oneDNN picks the blocked layout for (see the module docstring)


def bf16_packing_available() -> bool:
    """oneDNN present in this torch build, with native bf16 on this CPU (avx512_bf16 or AMX)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(CpuPackedLinear):
    """y = x W^T + b for bf16 x (..., in) on the CPU, W held once in the plain (out, in) layout: this engine's bf16
    kernel takes calls of 1-16 rows, oneDNN the longer ones. With packed_prefill (or where the bf16 kernel does not
    run) a second copy in oneDNN's blocked layout is kept for oneDNN's calls, the faster one for them (see the module
    docstring)."""

    dtype = torch.bfloat16
    layout = "CPU-only bf16"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed_prefill: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # Plain attributes, not buffers: an opaque oneDNN tensor has no storage to save, copy or move, and the
        # plain weight is the same weight again (the checkpoint's parameter is the plain one, `dense_weight`).
        weight = weight.detach()
        if weight.dtype == torch.bfloat16 and weight.is_contiguous():
            # the model's own tensor, shared, not copied (the tied lm_head's is wte, which the lookup keeps);
            # gpt2.load has put it in huge pages, which this asks for in place where it has not
            self.plain_weight = weight
            collapse_into_huge_pages(weight.data_ptr(), weight.numel() * weight.element_size())
        else:
            self.plain_weight = huge_page_copy(weight.to(torch.bfloat16).contiguous())
        self.packed: torch.Tensor | None = None
        if packed_prefill or not build.bf16_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.plain_weight, PACKED_FOR_ROWS)
            if hasattr(torch.ops.mkldnn, "data_ptr"):  # a decode step may stream it: 2 MiB pages (gpt2.cpu.huge_pages)
                collapse_into_huge_pages(torch.ops.mkldnn.data_ptr(self.packed), torch.ops.mkldnn._nbytes(self.packed))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if small_batch_matmul.applies_bf16(x, self.plain_weight, self.bias):  # a decode step's 1-16 rows
            return small_batch_matmul.matmul_bf16(x, self.plain_weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._onednn_weight(), self.bias, "none", [], "")

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """gelu_new(x W^T + b), applied in fp32 before the output is rounded to bf16 (by oneDNN: its tanh GELU)."""
        if small_batch_matmul.applies_bf16(x, self.plain_weight, self.bias):
            return small_batch_matmul.matmul_bf16(x, self.plain_weight, self.bias, gelu=True)
        return torch.ops.mkldnn._linear_pointwise(x, self._onednn_weight(), self.bias, "gelu", [], "tanh")

    def _onednn_weight(self) -> torch.Tensor:
        return self.plain_weight if self.packed is None else self.packed

    def dense_weight(self) -> torch.Tensor:
        """The weight as an ordinary bf16 (out, in) tensor."""
        return self.plain_weight

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        # a copy of the plain weight: the constructor shares a bf16 tensor it is given, which would tie the copy
        # to this layer's memory
        return PackedLinear(self.dense_weight().clone(), self.bias, packed_prefill=self.packed is not None)

    def extra_repr(self) -> str:
        copies = "plain" if self.packed is None else "plain + oneDNN-packed"
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 ({copies})"


def why_not_packable(model: GPT2) -> str | None:
    """Why pack_bf16 cannot pack model, or None when it can."""
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return f"pack_bf16 needs a bf16 model on the CPU, got {model.dtype} on {model.device}"
    if model.backend.name != "torch":
        return f"pack_bf16 runs on the 'torch' backend, the model uses {model.backend.name!r}"
    if not bf16_packing_available():
        return ("pack_bf16 needs oneDNN with native bf16 on this CPU (avx512_bf16 or AMX); this CPU or torch "
                "build has neither")
    return None


@torch.no_grad()
def pack_bf16(model: GPT2, packed_prefill: bool = False) -> GPT2:
    """Replace, in place, every block's four linear layers and the lm_head by PackedLinear; returns model.

    The model must be bf16 on the CPU on the torch backend (see `why_not_packable`). Each layer keeps the block
    weight's plain tensor, and with packed_prefill a packed copy beside it (see `PackedLinear`); the lm_head's plain
    weight is wte, shared with the lookup.
    """
    reason = why_not_packable(model)
    if reason is not None:
        raise ValueError(reason)
    for block in model.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                             (block.mlp, "c_proj")):
            linear = getattr(parent, name)
            setattr(parent, name, PackedLinear(linear.weight, linear.bias, packed_prefill))
    model.lm_head = PackedLinear(model.wte.weight, None, packed_prefill)
    return model
