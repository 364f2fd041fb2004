/* Every transformer block of a CPU decode step in one call: 1 to 16 rows of one new token each, fp32 (see
 * gpt2/decode_blocks.py for why, and gpt2/model.py's Block for the same computation in torch); and the whole step,
 * token ids to logits, in one call (see gpt2/cpu_decode_step.py).
 *
 * Per block: qkv = n W_attn^T + b; each row's new key and value go to its cache slot; each head's query attends
 * over the row's cached keys; h += proj(attention); n = ln_2(h); h += proj(gelu_new(fc(n))); n = next_ln(h),
 * where next_ln is the next block's ln_1, or ln_f after the last. h and n are updated in place. The parts between
 * the matmuls (decode_ops_f32.h) serve the int8 step too (decode_step_int8.c).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "decode_ops_f32.h"
#include "decode_weights.h"
#include "simd_math.h"
#include "small_batch_matmul.h"

/* decode_ops_f32.h's: two passes over h's row in L1. */
void add_layer_norm_f32(float *h, const float *x, const float *w, const float *b, float *n, long B, long C,
                        float eps) {
    for (long row = 0; row < B; row++) {
        float *hr = h + row * C, *nr = n + row * C;
        const float *xr = x + row * C;
        vfloat sum = vzero();
        for (long c = 0; c < C; c += VLANES) {
            const vfloat v = vadd(vload(hr + c), vload(xr + c));
            vstore(hr + c, v);
            sum = vadd(sum, v);
        }
        const vfloat mean = vset1(vreduce_add(sum) / C);
        vfloat squares = vzero();
        for (long c = 0; c < C; c += VLANES) {
            const vfloat d = vsub(vload(hr + c), mean);
            squares = vfmadd(d, d, squares);
        }
        const vfloat rstd = vset1(1.0f / sqrtf(vreduce_add(squares) / C + eps));
        for (long c = 0; c < C; c += VLANES) {
            const vfloat d = vmul(vsub(vload(hr + c), mean), rstd);
            vstore(nr + c, vfmadd(d, vload(w + c), vload(b + c)));
        }
    }
}

int cached_attention_f32(const float *qkv, float *k, float *v, const int *slot, const int *kv_len, float *out,
                         long B, long H, long D, long max_len) {
    const long C = H * D;
    for (long b = 0; b < B; b++) {
        if (kv_len[b] <= slot[b]) continue;
        for (long h = 0; h < H; h++) {
            const long at = (b * H + h) * max_len * D + slot[b] * D;
            for (long d = 0; d < D; d += VLANES) {
                vstore(k + at + d, vload(qkv + b * 3 * C + C + h * D + d));
                vstore(v + at + d, vload(qkv + b * 3 * C + 2 * C + h * D + d));
            }
        }
    }
    const attention_strides q_strides = {3 * C, D, 0}, kv_strides = {H * max_len * D, max_len * D, D},
                            out_strides = {C, D, 0};
    return attention_f32(qkv, q_strides, k, v, kv_strides, slot, kv_len, out, out_strides, B, H, 1, max_len, D);
}

/* h, n (B, C): the residual stream and ln_1 of it for the first block; on return, after every block, and ln_f of
 * it. k_cache, v_cache (n_layer, B, H, max_len, D). slot, kv_len (B,): see cached_attention_f32.
 * Returns 0; -1 for B outside 1..SMALL_BATCH_MAX_ROWS, C or D not a multiple of 16, or D over ATTENTION_MAX_HEAD_DIM
 * (nothing done); -2 when out of memory. */
int decode_blocks_f32(const block_weights *blocks, long n_layer, float *h, float *n, long B, long C, long H,
                      float *k_cache, float *v_cache, long max_len, const int *slot, const int *kv_len, float eps) {
    if (!step_shape_taken(B, C, H, 16)) return -1;
    const long D = C / H;
    float *qkv = malloc(sizeof(float) * B * 9 * C); /* qkv (B, 3C), then attention and projection (B, C), fc (B, 4C) */
    if (!qkv) return -2;
    float *attn = qkv + B * 3 * C, *proj = attn + B * C, *fc = proj + B * C;
    int status = 0;
    for (long layer = 0; layer < n_layer; layer++) {
        const block_weights *w = blocks + layer;
        const long cache_offset = layer * B * H * max_len * D;
        small_batch_matmul_f32(w->attn_w, n, w->attn_b, qkv, B, 3 * C, C, 0);
        status = cached_attention_f32(qkv, k_cache + cache_offset, v_cache + cache_offset, slot, kv_len, attn, B, H,
                                      D, max_len);
        if (status) break; /* out of memory: h and n are left part-way, the caller raises */
        small_batch_matmul_f32(w->attn_proj_w, attn, w->attn_proj_b, proj, B, C, C, 0);
        add_layer_norm_f32(h, proj, w->ln_2_w, w->ln_2_b, n, B, C, eps);
        small_batch_matmul_f32(w->fc_w, n, w->fc_b, fc, B, 4 * C, C, 1);
        small_batch_matmul_f32(w->mlp_proj_w, fc, w->mlp_proj_b, proj, B, C, 4 * C, 0);
        add_layer_norm_f32(h, proj, w->next_ln_w, w->next_ln_b, n, B, C, eps);
    }
    free(qkv);
    return status;
}

void embed_f32(const float *wte, const float *wpe, const float *ln_w, const float *ln_b, const long *tokens,
               const int *slot, long B, long C, float eps, float *h, float *n, int *kv_len) {
    for (long b = 0; b < B; b++) {
        memcpy(h + b * C, wte + tokens[b] * C, sizeof(float) * C);
        add_layer_norm_f32(h + b * C, wpe + (long)slot[b] * C, ln_w, ln_b, n + b * C, 1, C, eps);
        kv_len[b] = slot[b] + 1;
    }
}

/* One decode step of B rows, token ids to logits: h = wte[tokens[b]] + wpe[slot[b]], n = ln_1(h), every block (see
 * decode_blocks_f32: each row's new key and value go to slot[b], its query attends keys [0, slot[b]]), then logits
 * (B, vocab) = ln_f(h) lm_head^T. Returns 0; step_refusal's status for what it does not take (decode_weights.h:
 * nothing done); else decode_blocks_f32's status. */
int decode_step_f32(const model_weights *m, const long *tokens, long B, float *k_cache, float *v_cache, long max_len,
                    const int *slot, float *logits) {
    const long C = m->C;
    const int refusal = step_refusal(C, m->H, 16, tokens, slot, B, m->vocab, m->n_positions, max_len);
    if (refusal) return refusal;
    int kv_len[SMALL_BATCH_MAX_ROWS];
    float *h = malloc(sizeof(float) * 2 * B * C); /* h (B, C), then n (B, C) */
    if (!h) return -2;
    float *n = h + B * C;
    embed_f32(m->wte, m->wpe, m->ln_1_w, m->ln_1_b, tokens, slot, B, C, m->eps, h, n, kv_len);
    int status = decode_blocks_f32(m->blocks, m->n_layer, h, n, B, C, m->H, k_cache, v_cache, max_len, slot, kv_len,
                                   m->eps);
    if (!status) small_batch_matmul_f32(m->lm_head, n, NULL, logits, B, m->vocab, C, 0);
    free(h);
    return status;
}
