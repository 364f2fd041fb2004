/* Causal attention of a chunk of queries over the KV cache, fp32 (see attention_f32.h).
 *
 * The threads (OpenMP, torch's runtime) split the (row, head) pairs; each query's scores are taken 16 keys at a time,
 * as 16 dot products summed across lanes together (sum16), then soft-maxed and used to weight the values in one
 * pass, with the query's output in registers. A prefill chunk's attention is small (DialoGPT-small, 8 rows of 32
 * tokens: 12 heads of 32 x 32 scores per row), and torch's SDPA spends most of its time outside the arithmetic there.
 */
#include <math.h>
#include <stdlib.h>

#include "attention_f32.h"
#include "simd_math.h"

/* Lane j: q . k_j for the 16 keys from k on (key stride ks floats), of which the first n can be read: lanes from n on
 * repeat the last of those (the caller masks them). Each key is read whole before the next, in memory order: a
 * decode step over a long cache streams its keys from DRAM, and walking the 16 keys a vector at a time was slower
 * there (DialoGPT-small, 8 rows over 1000 cached tokens: 48-56 ms a step against 36-45). */
static inline __attribute__((always_inline)) __m512 block_scores(const float *q, const float *k, long ks, long n,
                                                                long D) {
    __m512 acc[16];
    for (int j = 0; j < 16; j++) {
        const float *key = k + (j < n ? j : n - 1) * ks;
        acc[j] = _mm512_setzero_ps();
        for (long d = 0; d < D; d += 16)
            acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(key + d), acc[j]);
    }
    return sum16(acc);
}

/* out = softmax(scale q . K^T) V over the first n_keys of the S keys and values (stride ks floats); p: room for the
 * scores. Blocks of 16 keys read past n_keys where the keys are there (their lanes masked), so that almost every
 * block takes the unmasked path: in a causal chunk, half of them end inside a block. The values are summed in two
 * sets of accumulators (even and odd keys), twice the chains of dependent FMAs in flight. */
static inline __attribute__((always_inline)) void attend(const float *q, const float *k, const float *v, long ks,
                                                         long n_keys, long S, float scale, float *p, float *out,
                                                         long D) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (long s = 0; s < n_keys; s += 16) {
        const long readable = S - s;
        const __m512 dots = readable >= 16 ? block_scores(q, k + s * ks, ks, 16, D)
                                           : block_scores(q, k + s * ks, ks, readable, D);
        const __m512 scores = _mm512_mul_ps(dots, _mm512_set1_ps(scale));
        const __mmask16 lanes = first_lanes(n_keys - s);
        _mm512_mask_storeu_ps(p + s, lanes, scores);
        top = _mm512_mask_max_ps(top, lanes, top, scores);
    }
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (long s = 0; s < n_keys; s += 16) {
        const __mmask16 lanes = first_lanes(n_keys - s);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, p + s), max));
        _mm512_mask_storeu_ps(p + s, lanes, e);
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(lanes, e));
    }
    const __m512 inv_total = _mm512_set1_ps(n_keys ? 1.0f / _mm512_reduce_add_ps(total) : 0.0f);
    __m512 even[ATTENTION_MAX_HEAD_DIM / 16], odd[ATTENTION_MAX_HEAD_DIM / 16];
    for (long d = 0; d < D; d += 16) even[d / 16] = odd[d / 16] = _mm512_setzero_ps();
    long s = 0;
    for (; s + 1 < n_keys; s += 2) {
        const __m512 w0 = _mm512_set1_ps(p[s]), w1 = _mm512_set1_ps(p[s + 1]);
        for (long d = 0; d < D; d += 16) {
            even[d / 16] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(v + s * ks + d), even[d / 16]);
            odd[d / 16] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(v + (s + 1) * ks + d), odd[d / 16]);
        }
    }
    if (s < n_keys)
        for (long d = 0; d < D; d += 16)
            even[d / 16] = _mm512_fmadd_ps(_mm512_set1_ps(p[s]), _mm512_loadu_ps(v + s * ks + d), even[d / 16]);
    for (long d = 0; d < D; d += 16)
        _mm512_storeu_ps(out + d, _mm512_mul_ps(_mm512_add_ps(even[d / 16], odd[d / 16]), inv_total));
}

/* `attend` with GPT-2's head_dim of 64 as a constant, so that its loops over a head unroll into registers. */
static void attend_any(const float *q, const float *k, const float *v, long ks, long n_keys, long S, float scale,
                       float *p, float *out, long D) {
    if (D == 64)
        attend(q, k, v, ks, n_keys, S, scale, p, out, 64);
    else
        attend(q, k, v, ks, n_keys, S, scale, p, out, D);
}

int attention_f32(const float *q, attention_strides q_strides, const float *k, const float *v,
                  attention_strides kv_strides, const int *q_start, const int *kv_len, float *out,
                  attention_strides out_strides, long B, long H, long T, long S, long D) {
    if (D < 16 || D % 16 || D > ATTENTION_MAX_HEAD_DIM) return -1;
    long max_keys = 0;
    for (long b = 0; b < B; b++) max_keys = kv_len[b] > max_keys ? kv_len[b] : max_keys;
    const float scale = 1.0f / sqrtf((float)D);
    int failed = 0;
#pragma omp parallel
    {
        float *p = malloc(sizeof(float) * (max_keys + 16)); /* this thread's scores, then probabilities */
        if (!p) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long bh = 0; bh < B * H; bh++) {
            if (!p) continue;
            const long b = bh / H, h = bh % H;
            const float *kh = k + b * kv_strides.b + h * kv_strides.h, *vh = v + b * kv_strides.b + h * kv_strides.h;
            for (long t = 0; t < T; t++) {
                const long visible = (long)q_start[b] + t + 1, n_keys = visible < kv_len[b] ? visible : kv_len[b];
                attend_any(q + b * q_strides.b + h * q_strides.h + t * q_strides.t, kh, vh, kv_strides.t,
                           n_keys > 0 ? n_keys : 0, S, scale, p,
                           out + b * out_strides.b + h * out_strides.h + t * out_strides.t, D);
            }
        }
        free(p);
    }
    return failed ? -2 : 0;
}
