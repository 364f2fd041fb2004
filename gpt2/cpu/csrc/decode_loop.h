/* The decode steps' layer loop and the work around their matmuls, shared by the fp32 (decode_blocks_f32.c,
 * decode_step_f32.c through decode_f32.h), bf16 (decode_step_bf16.c) and int8 (decode_step_int8.c) steps: 1 to 16
 * rows of one new token each (see gpt2/cpu/decode_step.py, and gpt2/model.py's Block for the same computation in
 * torch). Its includer first defines:
 *   ELEM, load_elem, store_elem, ELEM_TARGET and attention.h's rounding: the element type (elem_f32.h, or bf16) of
 *     the embeddings, the LayerNorms' parameters, the matmuls' inputs and outputs, the KV cache and the logits;
 *     store_elem rounds LayerNorm's and attention's fp32 outputs for the next matmul
 *   optionally, by including kv_bf16.h or kv_f16.h, a KV cache of another type (kv_elem.h), into which each new key
 *     and value is rounded and which attention.h reads widened to fp32
 *   STEP_BLOCK_WEIGHTS, STEP_MODEL_WEIGHTS: its weight tables (decode_weights.h)
 *   matmul(W, b, X, Y, m, rows, cols, gelu): its linears' Y = X W^T + b (small_batch_matmul.h); 0 or an error status
 *
 * The residual stream h stays fp32 for the whole step; n, the LayerNorm of it, is the next matmul's input. Per block:
 * qkv = n W_attn^T + b; each row's new key and value go to its cache slot; each head's query attends over the row's
 * cached keys; h += proj(attention); n = ln_2(h); h += proj(gelu_new(fc(n))); n = next_ln(h), where next_ln is the
 * next block's ln_1, or ln_f after the last.
 */
#pragma once
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "decode_weights.h"
#include "kv_elem.h"
#include "simd.h"
#include "small_batch_matmul.h"

/* h += x, then n = LayerNorm(h) w + b, for one row of C (a multiple of VLANES): two passes over h in L1. */
static inline ELEM_TARGET void add_layer_norm(float *h, const ELEM *x, const ELEM *w, const ELEM *b, ELEM *n, long C,
                                              float eps) {
    vfloat sum = vzero();
    for (long c = 0; c < C; c += VLANES) {
        const vfloat v = vadd(vload(h + c), load_elem(x + c));
        vstore(h + c, v);
        sum = vadd(sum, v);
    }
    const vfloat mean = vset1(vreduce_add(sum) / C);
    vfloat squares = vzero();
    for (long c = 0; c < C; c += VLANES) {
        const vfloat d = vsub(vload(h + c), mean);
        squares = vfmadd(d, d, squares);
    }
    const vfloat rstd = vset1(1.0f / sqrtf(vreduce_add(squares) / C + eps));
    for (long c = 0; c < C; c += VLANES) {
        const vfloat d = vmul(vsub(vload(h + c), mean), rstd);
        store_elem(n + c, vfmadd(d, load_elem(w + c), load_elem(b + c)));
    }
}

/* add_layer_norm of each of B rows (h, x, n: (B, C)). */
static inline ELEM_TARGET void add_layer_norms(float *h, const ELEM *x, const ELEM *w, const ELEM *b, ELEM *n, long B,
                                               long C, float eps) {
    for (long row = 0; row < B; row++) add_layer_norm(h + row * C, x + row * C, w, b, n + row * C, C, eps);
}

/* A step's start: h (B, C) = wte[tokens[b]] + wpe[slot[b]], n = LayerNorm(h) with ln_w, ln_b, and kv_len[b] =
 * slot[b] + 1 (each row adds its token at slot[b]). */
static inline ELEM_TARGET void embed(const ELEM *wte, const ELEM *wpe, const ELEM *ln_w, const ELEM *ln_b,
                                     const long *tokens, const int *slot, long B, long C, float eps, float *h, ELEM *n,
                                     int *kv_len) {
    for (long b = 0; b < B; b++) {
        for (long c = 0; c < C; c += VLANES) vstore(h + b * C + c, load_elem(wte + tokens[b] * C + c));
        add_layer_norm(h + b * C, wpe + (long)slot[b] * C, ln_w, ln_b, n + b * C, C, eps);
        kv_len[b] = slot[b] + 1;
    }
}

/* Writes row b's new key and value (qkv's k and v parts, rounded to CACHE_ELEM) at slot[b] of this layer's cache k, v
 * (B, H, max_len, D) where the row adds a token (kv_len > slot), then out (B, H, D) = attention of each head's query
 * over the row's keys [0, min(slot + 1, kv_len)). qkv (B, 3, H, D). Returns 0, or -2 when out of memory. */
static inline ELEM_TARGET int cached_attention(const ELEM *qkv, CACHE_ELEM *k, CACHE_ELEM *v, const int *slot,
                                               const int *kv_len, ELEM *out, long B, long H, long D, long max_len) {
    const long C = H * D;
    for (long b = 0; b < B; b++) {
        if (kv_len[b] <= slot[b]) continue;
        for (long h = 0; h < H; h++) {
            const long at = ((b * H + h) * max_len + slot[b]) * D;
            write_cache(k + at, qkv + b * 3 * C + C + h * D, D);
            write_cache(v + at, qkv + b * 3 * C + 2 * C + h * D, D);
        }
    }
    const attention_strides q_strides = {3 * C, D, 0}, kv_strides = {H * max_len * D, max_len * D, D},
                            out_strides = {C, D, 0};
    return attention(qkv, q_strides, k, v, kv_strides, slot, kv_len, out, out_strides, B, H, 1, max_len, D);
}

/* Every block over h, n (B, C), the residual stream and ln_1 of it for the first block; on return, after every
 * block, and ln_f of it. k_cache, v_cache (n_layer, B, H, max_len, D); slot, kv_len (B,): see cached_attention.
 * Returns 0, or the first error status (-2: out of memory), which leaves h and n part-way. */
static inline ELEM_TARGET int decode_layers(const STEP_BLOCK_WEIGHTS *blocks, long n_layer, float *h, ELEM *n, long B,
                                            long C, long H, CACHE_ELEM *k_cache, CACHE_ELEM *v_cache, long max_len,
                                            const int *slot, const int *kv_len, float eps) {
    const long D = C / H;
    ELEM *qkv = malloc(sizeof(ELEM) * B * 9 * C); /* qkv (B, 3C), then attention and projection (B, C), fc (B, 4C) */
    if (!qkv) return -2;
    ELEM *attn = qkv + B * 3 * C, *proj = attn + B * C, *fc = proj + B * C;
    int status = 0;
    for (long layer = 0; layer < n_layer; layer++) {
        const STEP_BLOCK_WEIGHTS *w = blocks + layer;
        const long cache_offset = layer * B * H * max_len * D;
        status = matmul(w->attn_w, w->attn_b, n, qkv, B, 3 * C, C, 0);
        if (!status) status = cached_attention(qkv, k_cache + cache_offset, v_cache + cache_offset, slot, kv_len,
                                               attn, B, H, D, max_len);
        if (!status) status = matmul(w->attn_proj_w, w->attn_proj_b, attn, proj, B, C, C, 0);
        if (status) break;
        add_layer_norms(h, proj, w->ln_2_w, w->ln_2_b, n, B, C, eps);
        status = matmul(w->fc_w, w->fc_b, n, fc, B, 4 * C, C, 1);
        if (!status) status = matmul(w->mlp_proj_w, w->mlp_proj_b, fc, proj, B, C, 4 * C, 0);
        if (status) break;
        add_layer_norms(h, proj, w->next_ln_w, w->next_ln_b, n, B, C, eps);
    }
    free(qkv);
    return status;
}

/* One decode step of B rows, token ids to logits (B, vocab): h = wte[tokens[b]] + wpe[slot[b]], n = ln_1(h), every
 * block (each row's new key and value written at slot[b], its query attending keys [0, slot[b]]), then logits =
 * ln_f(h) lm_head^T (+ its bias, where it has one). Returns 0, or the first error status (-2: out of memory). */
static inline ELEM_TARGET int decode_step(const STEP_MODEL_WEIGHTS *m, const long *tokens, long B,
                                          CACHE_ELEM *k_cache, CACHE_ELEM *v_cache, long max_len, const int *slot,
                                          ELEM *logits) {
    const long C = m->C;
    float *h = malloc(sizeof(float) * B * C);
    ELEM *n = malloc(sizeof(ELEM) * B * C);
    if (!h || !n) {
        free(h), free(n);
        return -2;
    }
    int kv_len[SMALL_BATCH_MAX_ROWS];
    embed(m->wte, m->wpe, m->ln_1_w, m->ln_1_b, tokens, slot, B, C, m->eps, h, n, kv_len);
    int status = decode_layers(m->blocks, m->n_layer, h, n, B, C, m->H, k_cache, v_cache, max_len, slot, kv_len,
                               m->eps);
    if (!status) status = matmul(m->lm_head, m->lm_head_b, n, logits, B, m->vocab, C, 0);
    free(h), free(n);
    return status;
}
