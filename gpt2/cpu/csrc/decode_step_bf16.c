/* A whole decode step of a bf16 model in one call, token ids to logits: 1 to 16 rows of one new token each (see
 * gpt2/cpu_decode_step.py, and decode_blocks_f32.c for the same step in fp32).
 *
 * The weights, the KV cache and the logits are bf16; the matmuls are small_batch_matmul_bf16's (bf16 inputs, fp32
 * sums, each output rounded to bf16 once). Between them the step works in fp32: the residual stream stays fp32 for
 * the whole step, each LayerNorm is taken of it in fp32 and rounded to bf16 as the next matmul's input, and
 * attention converts the bf16 query, keys and values to fp32 and rounds its output once. torch's bf16 ops round the
 * residual stream to bf16 after every add, so this step's logits are nearer the fp32 model's than theirs.
 * Per block: qkv = n W_attn^T + b; each row's new key and value go to its cache slot; each head's query attends over
 * the row's keys [0, slot]; h += proj(attention); n = ln_2(h); h += proj(gelu_new(fc(n))); n = next_ln(h).
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "attention_f32.h"
#include "bf16.h"
#include "decode_weights.h"
#include "simd_math.h"
#include "small_batch_matmul.h"

#if VLANES == 16 /* an AVX-512 build (simd.h); elsewhere the function below refuses every call */
#define ALL_LANES ((__mmask16)0xFFFF)

/* h += x (C bf16), then n = LayerNorm(h) * w + b rounded to bf16, for one row of C floats; h is fp32. */
static BF16_TARGET void add_layer_norm(float *h, const uint16_t *x, const uint16_t *w, const uint16_t *b,
                                       uint16_t *n, long C, float eps) {
    __m512 sum = _mm512_setzero_ps();
    for (long c = 0; c < C; c += 16) {
        const __m512 v = _mm512_add_ps(_mm512_loadu_ps(h + c), load_bf16(x + c, ALL_LANES));
        _mm512_storeu_ps(h + c, v);
        sum = _mm512_add_ps(sum, v);
    }
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / C);
    __m512 squares = _mm512_setzero_ps();
    for (long c = 0; c < C; c += 16) {
        const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(h + c), mean);
        squares = _mm512_fmadd_ps(d, d, squares);
    }
    const __m512 rstd = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / C + eps));
    for (long c = 0; c < C; c += 16) {
        const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(h + c), mean), rstd);
        store_bf16(n + c, ALL_LANES, _mm512_fmadd_ps(d, load_bf16(w + c, ALL_LANES), load_bf16(b + c, ALL_LANES)));
    }
}

/* out = softmax(q . K^T / sqrt(D)) V over n_keys keys and values of D (rows D apart), in fp32; p: room for n_keys
 * scores rounded up to 16. */
static BF16_TARGET void attend(const uint16_t *q, const uint16_t *k, const uint16_t *v, long n_keys, long D,
                               float *p, uint16_t *out) {
    __m512 qv[ATTENTION_MAX_HEAD_DIM / 16], acc[ATTENTION_MAX_HEAD_DIM / 16];
    const float scale = 1.0f / sqrtf((float)D);
    for (long d = 0; d < D; d += 16) qv[d / 16] = _mm512_mul_ps(load_bf16(q + d, ALL_LANES), _mm512_set1_ps(scale));
    float top = -INFINITY;
    for (long s = 0; s < n_keys; s++) {
        __m512 dot = _mm512_setzero_ps();
        for (long d = 0; d < D; d += 16) dot = _mm512_fmadd_ps(qv[d / 16], load_bf16(k + s * D + d, ALL_LANES), dot);
        p[s] = _mm512_reduce_add_ps(dot);
        top = p[s] > top ? p[s] : top;
    }
    __m512 total = _mm512_setzero_ps();
    for (long s = 0; s < n_keys; s += 16) {
        const vmask lanes = first_lanes(n_keys - s);
        const __m512 e = _mm512_maskz_mov_ps(lanes, vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, p + s),
                                                                       _mm512_set1_ps(top))));
        _mm512_mask_storeu_ps(p + s, lanes, e);
        total = _mm512_add_ps(total, e);
    }
    for (long d = 0; d < D; d += 16) acc[d / 16] = _mm512_setzero_ps();
    for (long s = 0; s < n_keys; s++) {
        const __m512 weight = _mm512_set1_ps(p[s]);
        for (long d = 0; d < D; d += 16)
            acc[d / 16] = _mm512_fmadd_ps(weight, load_bf16(v + s * D + d, ALL_LANES), acc[d / 16]);
    }
    const __m512 inv_total = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (long d = 0; d < D; d += 16) store_bf16(out + d, ALL_LANES, _mm512_mul_ps(acc[d / 16], inv_total));
}

/* Writes row b's new key and value (qkv's k and v parts) at slot[b] of this layer's cache k, v (B, H, max_len, D),
 * then out[b, h] (B, H, D) = attention of the row's query over its keys [0, slot[b]], the threads splitting the
 * (row, head) pairs. qkv (B, 3, H, D). Returns 0, or -2 when out of memory. */
static BF16_TARGET int cached_attention(const uint16_t *qkv, uint16_t *k, uint16_t *v, const int *slot, uint16_t *out,
                                        long B, long H, long D, long max_len) {
    const long C = H * D;
    long max_keys = 0;
    for (long b = 0; b < B; b++) {
        max_keys = slot[b] + 1 > max_keys ? slot[b] + 1 : max_keys;
        for (long h = 0; h < H; h++) {
            const long at = ((b * H + h) * max_len + slot[b]) * D;
            memcpy(k + at, qkv + b * 3 * C + C + h * D, sizeof(uint16_t) * D);
            memcpy(v + at, qkv + b * 3 * C + 2 * C + h * D, sizeof(uint16_t) * D);
        }
    }
    /* each thread's scores, then probabilities */
    float *scores = malloc(sizeof(float) * omp_get_max_threads() * (max_keys + 16));
    if (!scores) return -2;
#pragma omp parallel for schedule(static)
    for (long bh = 0; bh < B * H; bh++) {
        const long b = bh / H, h = bh % H, head = bh * max_len * D;
        attend(qkv + b * 3 * C + h * D, k + head, v + head, slot[b] + 1, D,
               scores + omp_get_thread_num() * (max_keys + 16), out + bh * D);
    }
    free(scores);
    return 0;
}

static BF16_TARGET int decode_step(const model_weights_bf16 *m, const long *tokens, long B, uint16_t *k_cache,
                                   uint16_t *v_cache, long max_len, const int *slot, uint16_t *logits) {
    const long C = m->C, H = m->H, D = C / H;
    float *h = malloc(sizeof(float) * B * C); /* the residual stream (B, C), fp32 */
    /* bf16: n (B, C), qkv (B, 3C), attention (B, C), proj (B, C), fc (B, 4C) */
    uint16_t *n = malloc(sizeof(uint16_t) * B * 10 * C);
    if (!h || !n) {
        free(h), free(n);
        return -2;
    }
    uint16_t *qkv = n + B * C, *attn = qkv + B * 3 * C, *proj = attn + B * C, *fc = proj + B * C;
    for (long b = 0; b < B; b++) {
        for (long c = 0; c < C; c += 16)
            _mm512_storeu_ps(h + b * C + c, load_bf16(m->wte + tokens[b] * C + c, ALL_LANES));
        add_layer_norm(h + b * C, m->wpe + (long)slot[b] * C, m->ln_1_w, m->ln_1_b, n + b * C, C, m->eps);
    }
    int status = 0;
    for (long layer = 0; layer < m->n_layer; layer++) {
        const block_weights_bf16 *w = m->blocks + layer;
        const long cache_offset = layer * B * H * max_len * D;
        small_batch_matmul_bf16(w->attn_w, n, w->attn_b, qkv, B, 3 * C, C, 0);
        status = cached_attention(qkv, k_cache + cache_offset, v_cache + cache_offset, slot, attn, B, H, D, max_len);
        if (status) break; /* out of memory: the caller raises */
        small_batch_matmul_bf16(w->attn_proj_w, attn, w->attn_proj_b, proj, B, C, C, 0);
        for (long b = 0; b < B; b++)
            add_layer_norm(h + b * C, proj + b * C, w->ln_2_w, w->ln_2_b, n + b * C, C, m->eps);
        small_batch_matmul_bf16(w->fc_w, n, w->fc_b, fc, B, 4 * C, C, 1);
        small_batch_matmul_bf16(w->mlp_proj_w, fc, w->mlp_proj_b, proj, B, C, 4 * C, 0);
        for (long b = 0; b < B; b++)
            add_layer_norm(h + b * C, proj + b * C, w->next_ln_w, w->next_ln_b, n + b * C, C, m->eps);
    }
    if (!status) small_batch_matmul_bf16(m->lm_head, n, NULL, logits, B, m->vocab, C, 0);
    free(h), free(n);
    return status;
}
#endif

/* One decode step of B rows of a bf16 model, token ids to logits (B, vocab): h = wte[tokens[b]] + wpe[slot[b]],
 * n = ln_1(h), every block (each row's new key and value written at slot[b], its query attending keys [0, slot[b]]),
 * then logits = ln_f(h) lm_head^T; n_embd a multiple of 32. Returns 0; -2 when out of memory; else as
 * DECODE_STEP_ENTRY (a token or slot outside its range, a shape it does not take, a build without AVX-512). */
DECODE_STEP_ENTRY(decode_step_bf16, decode_step, model_weights_bf16, uint16_t, 32)
