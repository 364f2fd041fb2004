/* Causal attention of a chunk of queries over the KV cache, fp32 (see attention_f32.h).
 *
 * The threads (OpenMP, torch's runtime) split the (row, head) pairs; each query's scores are taken VLANES keys at a
 * time (a vector's lanes, simd.h), as that many dot products summed across lanes together (vsum_lanes), then
 * soft-maxed and used to weight the values in one pass, with the query's output in registers. A prefill chunk's
 * attention is small (DialoGPT-small, 8 rows of 32 tokens: 12 heads of 32 x 32 scores per row), and torch's SDPA
 * spends most of its time outside the arithmetic there.
 */
#include <math.h>
#include <stdlib.h>

#include "attention_f32.h"
#include "simd_math.h"

/* Lane j: q . k_j for the VLANES keys from k on (key stride ks floats), of which the first n can be read: lanes from
 * n on repeat the last of those (the caller masks them). Each key is read whole before the next, in memory order: a
 * decode step over a long cache streams its keys from DRAM, and walking the keys a vector at a time was slower
 * there (DialoGPT-small, 8 rows over 1000 cached tokens: 48-56 ms a step against 36-45). */
static inline __attribute__((always_inline)) vfloat block_scores(const float *q, const float *k, long ks, long n,
                                                                long D) {
    vfloat acc[VLANES];
    for (int j = 0; j < VLANES; j++) {
        const float *key = k + (j < n ? j : n - 1) * ks;
        acc[j] = vzero();
        for (long d = 0; d < D; d += VLANES)
            acc[j] = vfmadd(vload(q + d), vload(key + d), acc[j]);
    }
    return vsum_lanes(acc);
}

/* out = softmax(scale q . K^T) V over the first n_keys of the S keys and values (stride ks floats); p: room for the
 * scores. Blocks of VLANES keys read past n_keys where the keys are there (their lanes masked), so that almost every
 * block takes the unmasked path: in a causal chunk, half of them end inside a block. The values are summed in two
 * sets of accumulators (even and odd keys), twice the chains of dependent FMAs in flight. */
static inline __attribute__((always_inline)) void attend(const float *q, const float *k, const float *v, long ks,
                                                         long n_keys, long S, float scale, float *p, float *out,
                                                         long D) {
    vfloat top = vset1(-INFINITY);
    for (long s = 0; s < n_keys; s += VLANES) {
        const long readable = S - s;
        const vfloat dots = readable >= VLANES ? block_scores(q, k + s * ks, ks, VLANES, D)
                                           : block_scores(q, k + s * ks, ks, readable, D);
        const vfloat scores = vmul(dots, vset1(scale));
        const vmask lanes = first_lanes(n_keys - s);
        vmask_store(p + s, lanes, scores);
        top = vmask_max(lanes, top, scores);
    }
    const vfloat max = vset1(vreduce_max(top));
    vfloat total = vzero();
    for (long s = 0; s < n_keys; s += VLANES) {
        const vmask lanes = first_lanes(n_keys - s);
        const vfloat e = vexp(vsub(vmaskz_load(lanes, p + s), max));
        vmask_store(p + s, lanes, e);
        total = vadd(total, vmaskz_mov(lanes, e));
    }
    const vfloat inv_total = vset1(n_keys ? 1.0f / vreduce_add(total) : 0.0f);
    vfloat even[ATTENTION_MAX_HEAD_DIM / VLANES], odd[ATTENTION_MAX_HEAD_DIM / VLANES];
    for (long d = 0; d < D; d += VLANES) even[d / VLANES] = odd[d / VLANES] = vzero();
    long s = 0;
    for (; s + 1 < n_keys; s += 2) {
        const vfloat w0 = vset1(p[s]), w1 = vset1(p[s + 1]);
        for (long d = 0; d < D; d += VLANES) {
            even[d / VLANES] = vfmadd(w0, vload(v + s * ks + d), even[d / VLANES]);
            odd[d / VLANES] = vfmadd(w1, vload(v + (s + 1) * ks + d), odd[d / VLANES]);
        }
    }
    if (s < n_keys)
        for (long d = 0; d < D; d += VLANES)
            even[d / VLANES] = vfmadd(vset1(p[s]), vload(v + s * ks + d), even[d / VLANES]);
    for (long d = 0; d < D; d += VLANES)
        vstore(out + d, vmul(vadd(even[d / VLANES], odd[d / VLANES]), inv_total));
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
        float *p = malloc(sizeof(float) * (max_keys + VLANES)); /* this thread's scores, then probabilities */
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
