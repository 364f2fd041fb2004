"""tl.dot with fp32 accumulation for fp32, fp16 and bf16 operands, and the launch options that choose its precision."""

import torch
import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. The Triton 3.9 interpreter multiplies bf16 operands as their raw uint16 storage;
    `dot_options` sets UPCAST for CPU tensors so that, there only, bf16 operands are widened to fp32 first."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


def dot_options(dtype: torch.dtype, device: torch.device) -> dict[str, object]:
    """`dot`'s PRECISION and UPCAST for operands of dtype on device: fp32 dots in full precision (tf32 applies to
    fp32 inputs only), bf16 widened under the interpreter."""
    return {"PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST": dtype == torch.bfloat16 and device.type == "cpu"}
