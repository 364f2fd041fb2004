"""Int8 linear layers for the CPU: per-output-channel int8 weights, activations quantized to int8 on the fly.

`quantize_int8(model)` replaces, in place, every block's four linear layers and the lm_head with
`Int8Linear`; the token embedding (a lookup) and everything else stay fp32, as do the KV cache, attention
and LayerNorm. Each matmul is torch's dynamic-quantization kernel (`quantized::linear_dynamic`, fbgemm):
it quantizes the input per tensor (uint8 with a zero point, from its min and max), multiplies int8 by int8
into int32 and returns fp32 with the bias added. Against int8 weights alone (with bf16 activations) it gives up about
one percentage point of logit error (relative RMS against fp32, DialoGPT-small: 3.2% against 2.2%; 5.2% with 7-bit
activations) for a decode step that measured markedly faster at 1 and 8 rows. Activations use all 8 bits
where the CPU has VNNI (32-bit accumulation); without it fbgemm's 16-bit pairwise sums could saturate,
so there they get 7 bits (`reduce_range`). The error against fp32 is printed by
`benchmarks/bench_generation.py` and bounded in tests/test_quantize.py, both on seeded random weights.
All rows of one call share an activation scale (every token of a prefill, every row of a batched step),
so a real checkpoint whose activations have outlier tokens may lose more there than measured here;
bf16 (`gpt2.cpu.bf16_linear`) has no such risk.

Where the CPU has avx512_vnni and the C kernels are built, a generation's decode steps run whole in one C call
instead (`gpt2.cpu.decode_step`, csrc/decode_step_int8.c), whose matmuls read a plain copy of the int8 weights kept
beside fbgemm's packed ones (so the int8 linears take twice their int8 size: half the fp32 weights' memory, not a
quarter) and quantize each input row on its own, by fbgemm's rule: a one-row step's logits are the forward's, a
batched step's rows each get their own scale (DialoGPT-small's shape, 4 rows: 3.10% against fbgemm's 3.13% relative
RMS error against fp32). That step measured faster than the forward through fbgemm.

Measured: docs/performance.md#gpt2cpuint8_linearpy-dynamic-int8
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from . import build
from .packed import CpuPackedLinear

if TYPE_CHECKING:
    from ..model import GPT2


def cpu_has_vnni() -> bool:
    """AVX-512 VNNI or AVX-VNNI (False where /proc/cpuinfo cannot be read)."""
    return bool({"avx512_vnni", "avx_vnni"} & build.cpu_flags())


def int8_available() -> bool:
    """torch's quantized CPU kernels are built in (fbgemm on x86, qnnpack on ARM)."""
    return (hasattr(torch.ops.quantized, "linear_dynamic")
            and any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "qnnpack")))


class Int8Linear(CpuPackedLinear):
    """y = dequant(quant(x) W_q^T) + b with W_q int8 (out, in), one scale per output row, x quantized per call."""

    dtype = torch.float32
    layout = "fbgemm-packed int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        scales = weight.abs().amax(dim=1).clamp(min=1e-12).double() / 127  # (out,)
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # torch marks its quantized tensor type deprecated; the kernels are current
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        # fbgemm's packed (opaque) weight and fp32 bias, a Python object: deepcopy copies it, nothing moves it
        try:
            self.packed = torch.ops.quantized.linear_prepack(
                quantized, None if bias is None else bias.detach().float().contiguous())
        except RuntimeError as e:  # an engine without per-channel int8 (some qnnpack builds)
            raise ValueError(f"quantize_int8: torch's quantized engine {torch.backends.quantized.engine!r} cannot "
                             f"pack per-channel int8 weights ({str(e).splitlines()[0]}); load with "
                             "dtype=torch.bfloat16 for a lower-precision path instead") from None
        self.reduce_range = not cpu_has_vnni()
        # Where the C decode step runs (`gpt2.cpu.decode_step`), the plain int8 weight (out, in) beside fbgemm's packed
        # one, and each row's scale, bias and sum of its int8 values (out, 3) (csrc/int8.h's int8_row)
        self.step_weight: torch.Tensor | None = None
        self.step_rows: torch.Tensor | None = None
        if build.int8_available():
            self.step_weight = quantized.int_repr()
            bias_values = torch.zeros(self.out_features) if bias is None else bias.detach().float()
            self.step_rows = torch.stack([scales.float(), bias_values, self.step_weight.sum(dim=1).float()], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight as int8 values (out, in) and their fp32 scales (out,)."""
        weight, _ = torch.ops.quantized.linear_unpack(self.packed)
        return weight.int_repr(), weight.q_per_channel_scales().float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


@torch.no_grad()
def quantize_int8(model: GPT2) -> GPT2:
    """Quantize model's block linears and lm_head to int8 in place (CPU, fp32 model); returns model.

    The fp32 block weights are released; the embedding keeps its fp32 table for the lookup, so the
    model holds about a quarter of its fp32 linear weights (half where the C decode step runs: see the module
    docstring) plus the fp32 embeddings.
    """
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(f"quantize_int8 needs an fp32 model on the CPU, got {model.dtype} on {model.device}")
    if not int8_available():
        raise ValueError(f"quantize_int8 needs torch's quantized CPU kernels (quantized::linear_dynamic with "
                         f"fbgemm or qnnpack), which torch {torch.__version__} lacks; load with "
                         "dtype=torch.bfloat16 for a lower-precision path instead")
    if model.backend.name != "torch":
        raise ValueError(f"quantize_int8 runs on the 'torch' backend, the model uses {model.backend.name!r}")
    for block in model.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                             (block.mlp, "c_proj")):
            linear = getattr(parent, name)
            setattr(parent, name, Int8Linear(linear.weight, linear.bias))
    model.lm_head = Int8Linear(model.wte.weight, None)  # untied: the lookup keeps wte in fp32
    return model
