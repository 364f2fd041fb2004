"""Int8 linear layers for the CPU: per-output-channel int8 weights, activations quantized to 8 bits on the fly.

`quantize_int8(model)` replaces, in place, every block's four linear layers and the lm_head with `Int8Linear`; the
token embedding (a lookup) and everything else stay fp32, as do the KV cache, attention and LayerNorm. Each matmul
quantizes its input to uint8 with a zero point (from its min and max), multiplies int8 by int8 into exact int32 sums
and returns fp32 with the bias added. Against int8 weights alone (with bf16 activations) this gives up about one
percentage point of logit error (relative RMS against fp32, DialoGPT-small: 3.2% against 2.2%) for a decode step that
measured markedly faster at 1 and 8 rows. The error against fp32 is printed by `benchmarks/bench_generation.py` and
bounded in tests/test_quantize.py, both on seeded random weights.

Where the CPU has avx512_vnni and the C kernels are built, each layer holds its weight once, plain (out, in) int8 in
2 MiB pages, and every call runs on it, each input row quantized on its own by fbgemm's rule
(`gpt2.cpu.int8_matmul`): a generation's decode steps whole in one C call (`gpt2.cpu.decode_step`,
csrc/decode_step_int8.c), the layer's own calls of 1-16 rows on the same C kernel, and longer ones (prefills) through
torch._int_mm with the same quantization, so a prompt's token gets what a decode step would give it. fbgemm's
dynamic int8 (`quantized::linear_dynamic`: its own packed copy of the weight, one activation scale for a whole call)
prefills faster; `gpt2.load(..., packed_prefill=True)` keeps that copy beside the plain one and runs the layer's calls
on it, as before this engine held one copy (both measured in docs/performance.md). Elsewhere fbgemm's copy is the
only one, and activations use all 8 bits where the CPU has VNNI (32-bit accumulation); without it fbgemm's 16-bit
pairwise sums could saturate, so there they get 7 bits (`reduce_range`). With fbgemm all rows of one call share an
activation scale (every token of a prefill, every row of a batched step), so a real checkpoint whose activations have
outlier tokens may lose more there than measured here; the plain weight's path scales each row on its own, and bf16
(`gpt2.cpu.bf16_linear`) has no such risk.

Measured: docs/performance.md#gpt2cpuint8_linearpy-dynamic-int8
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from . import build, int8_matmul
from .huge_pages import huge_page_empty
from .packed import CpuPackedLinear

if TYPE_CHECKING:
    from ..model import GPT2


BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # within a block, what quantize_int8 replaces
# Rows of a weight quantized at a time into the plain int8 weight: a whole wte's qint8 and int8 copies beside the
# result added 100 MB to DialoGPT-medium's peak during a load (gpt2.memory)
_QUANTIZE_ROWS = 4096


def cpu_has_vnni() -> bool:
    """AVX-512 VNNI or AVX-VNNI (False where /proc/cpuinfo cannot be read)."""
    return bool({"avx512_vnni", "avx_vnni"} & build.cpu_flags())


def int8_available() -> bool:
    """torch's quantized CPU kernels are built in (fbgemm on x86, qnnpack on ARM)."""
    return (hasattr(torch.ops.quantized, "linear_dynamic")
            and any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "qnnpack")))


class Int8Linear(CpuPackedLinear):
    """y = x W^T + b with W int8 (out, in), one scale per output row, x quantized to 8 bits per call or per row.

    One copy of the int8 weight: the plain (out, in) one (`step_weight`) where the C int8 kernels run, read by the C
    decode step and by `gpt2.cpu.int8_matmul` at every row count; fbgemm's packed one (`packed`) elsewhere. With
    packed_prefill, fbgemm's copy is kept beside the plain one too, and the layer's forward runs on it (x quantized
    per call), as before the plain weight served prefills: a faster prefill for a second copy (see the module
    docstring).
    """

    dtype = torch.float32
    layout = "CPU-only int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed_prefill: bool = False) -> None:
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        # max |w| per row without an |W|-sized temporary: the weight may be read straight from a checkpoint file
        scales = torch.maximum(weight.amax(dim=1), -weight.amin(dim=1)).clamp(min=1e-12).double() / 127  # (out,)
        self.reduce_range = not cpu_has_vnni()
        # Where the C int8 kernels run, the plain int8 weight (out, in), in 2 MiB pages (a decode step streams it), and
        # each row's scale, bias and sum of its int8 values (out, 3) (csrc/int8.h's int8_row)
        self.step_weight: torch.Tensor | None = None
        self.step_rows: torch.Tensor | None = None
        if build.int8_available():
            self.step_weight = huge_page_empty((self.out_features, self.in_features), torch.int8)
            for start in range(0, self.out_features, _QUANTIZE_ROWS):  # a slice at a time: see _QUANTIZE_ROWS
                rows = slice(start, start + _QUANTIZE_ROWS)
                self.step_weight[rows] = _quantize(weight[rows], scales[rows]).int_repr()
            bias_values = torch.zeros(self.out_features) if bias is None else bias.detach().float()
            # exact int32 sums against a column of ones: torch's sum of int8 goes through an int64 copy (a whole wte's
            # 300 MB; summed in chunks, the copies fragment the heap nearly as much)
            row_sums = torch._int_mm(self.step_weight, torch.ones(self.in_features, 1, dtype=torch.int8))[:, 0]
            self.step_rows = torch.stack([scales.float(), bias_values, row_sums.float()], dim=1)
        # fbgemm's packed (opaque) weight and fp32 bias, a Python object: deepcopy copies it, nothing moves it
        self.packed = None
        if packed_prefill or self.step_weight is None:
            try:
                self.packed = torch.ops.quantized.linear_prepack(
                    _quantize(weight, scales), None if bias is None else bias.detach().float().contiguous())
            except RuntimeError as e:  # an engine without per-channel int8 (some qnnpack builds)
                raise ValueError(f"quantize_int8: torch's quantized engine {torch.backends.quantized.engine!r} "
                                 f"cannot pack per-channel int8 weights ({str(e).splitlines()[0]}); load with "
                                 "dtype=torch.bfloat16 for a lower-precision path instead") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:  # fbgemm: x quantized per call
            return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)
        return int8_matmul.matmul(x, self.step_weight, self.step_rows)

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight as int8 values (out, in) and their fp32 scales (out,)."""
        if self.step_weight is not None:
            return self.step_weight, self.step_rows[:, 0]
        weight, _ = torch.ops.quantized.linear_unpack(self.packed)
        return weight.int_repr(), weight.q_per_channel_scales().float()

    def extra_repr(self) -> str:
        copies = "plain" if self.packed is None else "fbgemm-packed" if self.step_weight is None else "plain + fbgemm"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 ({copies})"


def _quantize(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """weight (rows, in) fp32 as a qint8 tensor, each row symmetric with its scale (rows,) (zero point 0)."""
    with warnings.catch_warnings():  # torch marks its quantized tensor type deprecated; the kernels are current
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(weight, scales, torch.zeros(len(scales), dtype=torch.long), 0, torch.qint8)


def why_not_quantizable(device: torch.device, dtype: torch.dtype, backend: str) -> str | None:
    """Why a model of dtype on device, on the named backend, cannot be quantized to int8; None where it can."""
    if device.type != "cpu" or dtype != torch.float32:
        return f"quantize_int8 needs an fp32 model on the CPU, got {dtype} on {device}"
    if not int8_available():
        return (f"quantize_int8 needs torch's quantized CPU kernels (quantized::linear_dynamic with fbgemm or "
                f"qnnpack), which torch {torch.__version__} lacks; load with dtype=torch.bfloat16 for a "
                "lower-precision path instead")
    if backend != "torch":
        return f"quantize_int8 runs on the 'torch' backend, the model uses {backend!r}"
    return None


@torch.no_grad()
def quantize_int8(model: GPT2, packed_prefill: bool = False) -> GPT2:
    """Quantize model's block linears and lm_head to int8 in place (CPU, fp32 model); returns model.

    The fp32 block weights are released; the embedding keeps its fp32 table for the lookup, so the model holds a
    quarter of its fp32 linear weights (half with packed_prefill where the C kernels run: see `Int8Linear`) plus the
    fp32 embeddings.
    """
    reason = why_not_quantizable(model.device, model.dtype, model.backend.name)
    if reason is not None:
        raise ValueError(reason)
    for parent, name in block_linears(model):
        linear = getattr(parent, name)
        setattr(parent, name, Int8Linear(linear.weight, linear.bias, packed_prefill))
    quantize_lm_head(model, packed_prefill)
    return model


def quantize_lm_head(model: GPT2, packed_prefill: bool = False) -> None:
    """Give model an int8 lm_head quantized from wte, untied: the lookup keeps wte in fp32."""
    model.lm_head = Int8Linear(model.wte.weight, None, packed_prefill)


def block_linears(model: GPT2) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute name) of every block's four linear layers (`BLOCK_LINEARS`), in order."""
    return [(block.get_submodule(parent), name) for block in model.h
            for parent, _, name in (path.rpartition(".") for path in BLOCK_LINEARS)]
