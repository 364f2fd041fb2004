"""Causal flash-attention forward for prefill: a chunk of T queries per row against its KV cache.

Query t of batch row b sits at absolute position q_start[b] + t and may attend key j iff
j <= q_start[b] + t and j < kv_len[b]. Rows are ragged (own q_start and kv_len), so a chunk can
continue a cache that already holds earlier tokens. Each program owns BLOCK_M queries of one
(batch, head) and streams the key blocks up to its last query's position with an online softmax
in fp32 (exp2 domain). K and V are addressed through their strides, so cache views
`cache[:, :, :S]` need no copy. (Splitting the key loop into unmasked and masked parts raised
register use past 255 with spills on sm_90 in a compile-only check, so every block is masked.)
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._attention_inputs import check_attention_inputs
from ._dot import dot, dot_options

_LOG2E = math.log2(math.e)


@triton.jit
def _attention_prefill_kernel(
    Q, K, V, Q_start, KV_len, Out,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T, S, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_start = tl.load(Q_start + b).to(tl.int32)
    kv_len = tl.minimum(tl.load(KV_len + b).to(tl.int32), S)

    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, HEAD_DIM)
    pos_m = q_start + offs_m  # absolute position of each query
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)  # (BLOCK_M, D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # No key past the last real query's position is visible; padding rows (position >= kv_len)
    # see every key below kv_len. Key 0 is visible to every row, so the first block sets finite
    # maxima and fully masked entries later contribute exp2(-inf) = 0.
    hi = tl.minimum(kv_len, q_start + tl.minimum(start_m + BLOCK_M, T))
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        key_ok = offs_n < kv_len
        kv_offs = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd  # (BLOCK_N, D)
        k = tl.load(k_base + kv_offs, mask=key_ok[:, None], other=0.0)  # (BLOCK_N, D)
        s = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), PRECISION, UPCAST) * qk_scale
        allowed = (offs_n[None, :] <= pos_m[:, None]) & key_ok[None, :]  # (BLOCK_M, BLOCK_N)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, D)
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)  # (BLOCK_M, D)
        m_i = m_new
    # kv_len == 0 leaves l_i == 0: write zeros rather than NaN.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < T)


def attention_prefill(
    q: Tensor, k: Tensor, v: Tensor, q_start: Tensor, kv_len: Tensor, sm_scale: float
) -> Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, H, S, D) with per-row offsets and lengths.

    q_start (B,): absolute position of q[b, :, 0]; kv_len (B,): valid keys of row b (>= 1).
    Returns (B, H, T, D) in q's dtype; query rows past kv_len get finite values to be ignored.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, T, D), got {tuple(q.shape)}")
    check_attention_inputs(q, k, v, (q_start, kv_len))
    B, H, T, D = q.shape
    S = k.shape[2]
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    # fp32 tiles need twice the registers: smaller blocks keep them from spilling (sm_90 compile).
    wide = q.dtype == torch.float32
    block_m = min(32 if wide else 64, max(16, triton.next_power_of_2(T)))
    block_n = 32 if wide or D > 64 else 64
    grid = (triton.cdiv(T, block_m), B * H)
    _attention_prefill_kernel[grid](
        q, k, v, q_start, kv_len, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, T, S, sm_scale * _LOG2E,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        **dot_options(q.dtype, q.device),
        num_warps=4, num_stages=3,
    )
    return out


def attention_prefill_reference(
    q: Tensor, k: Tensor, v: Tensor, q_start: Tensor, kv_len: Tensor, sm_scale: float
) -> Tensor:
    """Plain-torch masked attention: scores in q's dtype, softmax in fp32, P @ V in q's dtype."""
    T, S = q.shape[2], k.shape[2]
    pos = q_start.view(-1, 1) + torch.arange(T, device=q.device)  # (B, T)
    keys = torch.arange(S, device=q.device)
    allowed = (keys <= pos[:, :, None]) & (keys < kv_len.view(-1, 1, 1))  # (B, T, S)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * sm_scale  # (B, H, T, S)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.matmul(p.to(v.dtype), v)
