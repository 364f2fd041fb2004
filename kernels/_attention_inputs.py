"""Shape and dtype checks shared by the attention launchers."""

from torch import Tensor


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, lengths: tuple[Tensor, ...]) -> None:
    """Raise ValueError unless q (B, H, [T,] D) and k, v (B, H, S, D) agree and lengths are (B,)."""
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    if k.dim() != 4 or k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k and v must be (B, H, S, D) matching q; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if D < 16 or D > 128 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 128], got {D}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    for t in lengths:
        if t.shape != (B,):
            raise ValueError(f"per-row length tensors must be ({B},), got {tuple(t.shape)}")
