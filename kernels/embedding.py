"""The token + position embedding of a decode step, into the fp32 residual stream the fused step keeps.

One kernel for what takes torch three (two gathers and an add); the sum stays in fp32, so the stream is never rounded
to the model's dtype (the unfused step rounds it at every residual add).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK_C = 256


@triton.jit
def _embedding_kernel(Tokens, Positions, Wte, Wpe, Out, C, stride_te, stride_pe, stride_o, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < C
    token = tl.load(Tokens + row).to(tl.int64)
    position = tl.load(Positions + row).to(tl.int64)
    x = tl.load(Wte + token * stride_te + cols, mask=ok, other=0.0).to(tl.float32)
    x += tl.load(Wpe + position * stride_pe + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, x, mask=ok)


def embedding(tokens: Tensor, positions: Tensor, wte: Tensor, wpe: Tensor) -> Tensor:
    """wte[tokens] + wpe[positions] in fp32: tokens, positions (B,) int, wte (V, C), wpe (P, C); returns (B, C) fp32.
    Ids are not range-checked here (the model checks its inputs)."""
    B, C = tokens.shape[0], wte.shape[1]
    if tokens.shape != (B,) or positions.shape != (B,) or wpe.shape[1] != C:
        raise ValueError(f"tokens and positions must be (B,), wte and wpe (*, C); got {tuple(tokens.shape)}, "
                         f"{tuple(positions.shape)}, {tuple(wte.shape)}, {tuple(wpe.shape)}")
    if wte.stride(1) != 1 or wpe.stride(1) != 1:
        raise ValueError("wte and wpe must have unit column stride")
    out = torch.empty((B, C), dtype=torch.float32, device=tokens.device)
    _embedding_kernel[(B, triton.cdiv(C, _BLOCK_C))](
        tokens, positions, wte, wpe, out, C, wte.stride(0), wpe.stride(0), out.stride(0), BLOCK_C=_BLOCK_C,
        num_warps=2,
    )
    return out


def embedding_reference(tokens: Tensor, positions: Tensor, wte: Tensor, wpe: Tensor) -> Tensor:
    """Plain torch: the gathered rows, widened to fp32 (fp64 rows stay fp64), added."""
    wide = torch.float64 if wte.dtype == torch.float64 else torch.float32
    return wte[tokens.long()].to(wide) + wpe[positions.long()].to(wide)
