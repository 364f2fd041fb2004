"""Int8 weight-only quantization for the CPU: per-output-channel scales, bf16 activations into the matmul.

`quantize_int8(model)` replaces, in place, every block's four linear layers and the lm_head with
`Int8Linear`; the token embedding (a lookup) and everything else stay fp32, as do the KV cache, attention
and LayerNorm. The matmul is torch's `_weight_int8pack_mm` (the kernel behind torchao's int8 weight-only
CPU path). Chosen by measurement on an AMD EPYC (Zen 4, avx512_bf16, no AMX), 2 threads, all
DialoGPT-small linears at one row: 8.6 ms, against 19.3 ms fp32 (oneDNN), 51 ms for the same kernel fed
fp32 activations, 18.6 ms for bf16 weights, and 5.6 ms for torch's dynamic quantization (fbgemm), whose
int8 activations gave about 1.5x this path's logit error. The error against fp32 is printed by
`benchmarks/bench_generation.py` and bounded in tests/test_quantize.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .model import GPT2

_COMPUTE_DTYPE = torch.bfloat16  # the kernel's fast path takes bf16 activations (fp32 ones are ~6x slower)


class Int8Linear(nn.Module):
    """y = (x W_q^T) * scale + b with W_q int8 (out, in) and one scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float()
        # Rounded to bf16 first, so the integers are quantized against the scale the kernel actually applies.
        scales = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).to(_COMPUTE_DTYPE)  # (out,)
        quantized = torch.round(weight / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
        self.register_buffer("weight", quantized)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(_COMPUTE_DTYPE)  # (N, in)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)  # (N, out) bf16
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def quantize_int8(model: GPT2) -> GPT2:
    """Quantize model's block linears and lm_head to int8 in place (CPU, fp32 model); returns model.

    The fp32 block weights are released; the embedding keeps its fp32 table for the lookup, so the
    model holds about a quarter of its fp32 linear weights plus the fp32 embeddings.
    """
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(f"quantize_int8 needs an fp32 model on the CPU, got {model.dtype} on {model.device}")
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise ValueError(f"quantize_int8 needs torch.ops.aten._weight_int8pack_mm (torch >= 2.3), torch is "
                         f"{torch.__version__}")
    if model.backend.name != "torch":
        raise ValueError(f"quantize_int8 runs on the 'torch' backend, the model uses {model.backend.name!r}")
    for block in model.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                             (block.mlp, "c_proj")):
            linear = getattr(parent, name)
            setattr(parent, name, Int8Linear(linear.weight, linear.bias))
    model.lm_head = Int8Linear(model.wte.weight, None)  # untied: the lookup keeps wte in fp32
    return model
