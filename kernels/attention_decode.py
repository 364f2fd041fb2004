"""Flash-decoding: one query per (batch row, head) against its KV cache, split along the keys.

A decode step has only B * H queries, too few programs to fill a GPU if each owned a whole row.
The keys are therefore split into chunks: program (b*H + h, split) runs an fp32 online softmax
over its chunk and stores a partial output and its log-sum-exp (base 2); a second kernel merges
the splits of each (b, h). The split count comes from tensor shapes and the SM count only, never
from kv_len values, so the step launches without host syncs and can be captured in a CUDA graph;
chunks lying past kv_len exit at once. With one split the first kernel writes the output itself.
K and V are addressed through their strides, so cache views `cache[:, :, :S]` need no copy.
`attention_decode_partials` runs the first kernel alone, for the fused decode step, whose out-projection merges
the splits as it reads them (kernels/attention_residual.py).
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._attention_inputs import check_attention_inputs
from ._device import sm_count

_LOG2E = math.log2(math.e)
_PROGRAMS_PER_SM = 2  # programs to aim for per SM when choosing the split count


@triton.jit
def _decode_split_kernel(
    Q, K, V, KV_len, Out, O_part, LSE_part,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_od,
    H, S, split_size, num_splits, qk_scale,
    SINGLE_SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kv_len = tl.minimum(tl.load(KV_len + b).to(tl.int32), S)
    lo = split * split_size
    hi = tl.minimum(lo + split_size, kv_len)

    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d * stride_qd).to(tl.float32) * qk_scale  # (D,)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        key_ok = offs_n < hi
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=key_ok[:, None], other=0.0).to(tl.float32)  # (BLOCK_N, D)
        s = tl.where(key_ok, tl.sum(k * q[None, :], axis=1), float("-inf"))  # (BLOCK_N,)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp2(s - m_new)  # (BLOCK_N,)
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=key_ok[:, None], other=0.0).to(tl.float32)  # (BLOCK_N, D)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    # An empty chunk (or kv_len == 0) leaves l_i == 0: its output is 0 and its lse is -inf.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe  # (D,)
    if SINGLE_SPLIT:
        tl.store(Out + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty))
    else:
        part = bh.to(tl.int64) * num_splits + split
        tl.store(O_part + part * HEAD_DIM + offs_d, out)
        tl.store(LSE_part + part, m_i + tl.log2(l_safe))


@triton.jit
def _decode_combine_kernel(
    O_part, LSE_part, Out,
    stride_ob, stride_oh, stride_od,
    H, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    part = bh.to(tl.int64) * num_splits + offs_s  # (BLOCK_SPLITS,)
    in_range = offs_s < num_splits
    lse = tl.load(LSE_part + part, mask=in_range, other=float("-inf"))  # (BLOCK_SPLITS,)
    m = tl.max(lse, axis=0)
    m = tl.where(m > float("-inf"), m, 0.0)  # every split empty (kv_len == 0): weights all 0
    w = tl.exp2(lse - m)  # (BLOCK_SPLITS,)
    o_ptrs = O_part + part[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(o_ptrs, mask=in_range[:, None], other=0.0)  # (BLOCK_SPLITS, D)
    w_sum = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(w_sum > 0.0, w_sum, 1.0)  # (D,)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty))


def _split_plan(B: int, H: int, S: int, block_n: int, sms: int) -> tuple[int, int]:
    """(split_size, num_splits): enough (b, h, split) programs to fill the GPU, chunks of whole blocks."""
    wanted = max(1, min(triton.cdiv(_PROGRAMS_PER_SM * sms, B * H), triton.cdiv(S, block_n)))
    split_size = triton.cdiv(triton.cdiv(S, wanted), block_n) * block_n
    return split_size, triton.cdiv(S, split_size)


def _launch_split(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor, sm_scale: float, may_finish: bool
                  ) -> tuple[Tensor, Tensor | None]:
    """Run the split kernel. With may_finish and a single split it writes the output (B, H, D) in q's dtype:
    returns (out, None); else the fp32 partials: returns (o_part (B * H, splits, D), lse_part (B * H, splits))."""
    if q.dim() != 3:
        raise ValueError(f"q must be (B, H, D), got {tuple(q.shape)}")
    check_attention_inputs(q, k, v, (kv_len,))
    B, H, D = q.shape
    S = k.shape[2]
    block_n = 64 if D <= 64 else 32
    split_size, num_splits = _split_plan(B, H, S, block_n, sm_count(q.device))
    single = may_finish and num_splits == 1
    if single:  # the partials' pointers are unused
        out = o_part = lse_part = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    else:
        o_part = out = torch.empty((B * H, num_splits, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B * H, num_splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B * H, num_splits)](
        q, k, v, kv_len, out, o_part, lse_part,
        *q.stride(), *k.stride(), *v.stride(), *(out.stride() if single else (0, 0, 0)),
        H, S, split_size, num_splits, sm_scale * _LOG2E,
        SINGLE_SPLIT=single, HEAD_DIM=D, BLOCK_N=block_n,
        num_warps=4 if D >= 64 else 2,
    )
    return (out, None) if single else (o_part, lse_part)


def attention_decode(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor, sm_scale: float) -> Tensor:
    """Attention of one query per row, q (B, H, D), over keys j < kv_len[b] of k, v (B, H, S, D).

    kv_len (B,) int, >= 1. Returns (B, H, D) in q's dtype.
    """
    o_part, lse_part = _launch_split(q, k, v, kv_len, sm_scale, may_finish=True)
    if lse_part is None:
        return o_part
    B, H, D = q.shape
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    num_splits = lse_part.shape[1]
    _decode_combine_kernel[(B * H,)](
        o_part, lse_part, out, *out.stride(), H, num_splits,
        HEAD_DIM=D, BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        num_warps=1 if D <= 32 else 2,
    )
    return out


def attention_decode_partials(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor, sm_scale: float
                              ) -> tuple[Tensor, Tensor]:
    """The split kernel alone, for a consumer that merges the splits itself (`attention_residual`): per (b, h)
    and split, the output over that chunk of keys, o_part (B * H, splits, D) fp32, and its log-sum-exp in base 2,
    lse_part (B * H, splits) fp32 (-inf for an empty chunk). Same arguments as `attention_decode`."""
    o_part, lse_part = _launch_split(q, k, v, kv_len, sm_scale, may_finish=False)
    return o_part, lse_part


def attention_decode_reference(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor, sm_scale: float) -> Tensor:
    """Plain-torch decode attention: scores in q's dtype, softmax in fp32, P @ V in q's dtype."""
    S = k.shape[2]
    allowed = torch.arange(S, device=q.device) < kv_len.view(-1, 1)  # (B, S)
    scores = torch.matmul(k, q.unsqueeze(-1)).squeeze(-1).float() * sm_scale  # (B, H, S)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.matmul(p.to(v.dtype).unsqueeze(-2), v).squeeze(-2)  # (B, H, D)
