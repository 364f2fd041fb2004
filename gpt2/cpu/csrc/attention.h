/* Causal attention of a chunk of queries over the KV cache (see attention_f32.h) for one element type of q and out
 * and one of k and v (the same, or the cache's own), computed in fp32: attention_f32.c's kernel (fp32) and the decode
 * steps' (decode_loop.h: fp32 or bf16; the fp32 ones also over a bf16 or fp16 cache). Its includer first defines the
 * element type (elem_f32.h, decode_step_bf16.c):
 *   ELEM, load_elem(p), store_elem(p, v), ELEM_TARGET  the type, a vector of it as fp32, an fp32 vector rounded to it
 *                                                     and stored, the instruction sets those need
 *   ATTENTION_SCALES_QUERY  1: the query is scaled by 1 / sqrt(D) before its dot products; 0: the scores after them
 *   ATTENTION_VALUE_CHAINS  how many sets of accumulators the weighted values are summed in (key s in set s mod it)
 * The last two are each element type's rounding: changing them changes its logits. The keys and values are the KV
 * cache's type (kv_elem.h): ELEM, or where the includer took kv_bf16.h or kv_f16.h first, bf16 or fp16, widened to
 * fp32 as they are read.
 *
 * The threads (OpenMP, torch's runtime) split the (row, head) pairs; each query's scores are taken VLANES keys at a
 * time (a vector's lanes, simd.h), as that many dot products summed across lanes together (vsum_lanes), then
 * soft-maxed and used to weight the values in one pass, with the query's output in registers.
 */
#pragma once
#include <math.h>
#include <stdlib.h>

#include "attention_f32.h"
#include "kv_elem.h"
#include "simd_math.h"

/* Lane j: q . k_j for the VLANES keys from k on (key stride ks elements), of which the first n can be read: lanes
 * from n on repeat the last of those (the caller masks them). q: the query's D / VLANES vectors. Each key is read
 * whole before the next, in memory order: a decode step over a long cache streams its keys from DRAM, and walking the
 * keys a vector at a time was slower there (measured: docs/performance.md). */
static inline ELEM_TARGET __attribute__((always_inline)) vfloat block_scores(const vfloat *q, const CACHE_ELEM *k,
                                                                            long ks, long n, long D) {
    vfloat acc[VLANES];
    for (int j = 0; j < VLANES; j++) {
        const CACHE_ELEM *key = k + (j < n ? j : n - 1) * ks;
        acc[j] = vzero();
        for (long d = 0; d < D; d += VLANES)
            acc[j] = vfmadd(q[d / VLANES], load_cache(key + d), acc[j]);
    }
    return vsum_lanes(acc);
}

/* out = softmax(scale q . K^T) V over the first n_keys of the S keys and values (stride ks elements); p: room for the
 * scores. Blocks of VLANES keys read past n_keys where the keys are there (their lanes masked), so that almost every
 * block takes the unmasked path: in a causal chunk, half of them end inside a block. */
static inline ELEM_TARGET __attribute__((always_inline)) void attend(const ELEM *q, const CACHE_ELEM *k,
                                                                    const CACHE_ELEM *v, long ks, long n_keys, long S,
                                                                    float scale, float *p, ELEM *out, long D) {
    vfloat query[ATTENTION_MAX_HEAD_DIM / VLANES];
    for (long d = 0; d < D; d += VLANES)
        query[d / VLANES] = ATTENTION_SCALES_QUERY ? vmul(load_elem(q + d), vset1(scale)) : load_elem(q + d);
    vfloat top = vset1(-INFINITY);
    for (long s = 0; s < n_keys; s += VLANES) {
        const long readable = S - s;
        const vfloat dots = readable >= VLANES ? block_scores(query, k + s * ks, ks, VLANES, D)
                                               : block_scores(query, k + s * ks, ks, readable, D);
        const vfloat scores = ATTENTION_SCALES_QUERY ? dots : vmul(dots, vset1(scale));
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
    vfloat sums[ATTENTION_VALUE_CHAINS][ATTENTION_MAX_HEAD_DIM / VLANES];
    for (int c = 0; c < ATTENTION_VALUE_CHAINS; c++)
        for (long d = 0; d < D; d += VLANES) sums[c][d / VLANES] = vzero();
    long s = 0;
    for (; s + ATTENTION_VALUE_CHAINS <= n_keys; s += ATTENTION_VALUE_CHAINS)
        for (long d = 0; d < D; d += VLANES)
            for (int c = 0; c < ATTENTION_VALUE_CHAINS; c++)
                sums[c][d / VLANES] = vfmadd(vset1(p[s + c]), load_cache(v + (s + c) * ks + d),
                                             sums[c][d / VLANES]);
    for (; s < n_keys; s++) /* the last keys, fewer than a set: into the first set */
        for (long d = 0; d < D; d += VLANES)
            sums[0][d / VLANES] = vfmadd(vset1(p[s]), load_cache(v + s * ks + d), sums[0][d / VLANES]);
    for (long d = 0; d < D; d += VLANES) {
        vfloat sum = sums[0][d / VLANES];
        for (int c = 1; c < ATTENTION_VALUE_CHAINS; c++) sum = vadd(sum, sums[c][d / VLANES]);
        store_elem(out + d, vmul(sum, inv_total));
    }
}

/* `attend` with GPT-2's head_dim of 64 as a constant, so that its loops over a head unroll into registers. */
static ELEM_TARGET void attend_any(const ELEM *q, const CACHE_ELEM *k, const CACHE_ELEM *v, long ks, long n_keys,
                                   long S, float scale, float *p, ELEM *out, long D) {
    if (D == 64)
        attend(q, k, v, ks, n_keys, S, scale, p, out, 64);
    else
        attend(q, k, v, ks, n_keys, S, scale, p, out, D);
}

/* attention_f32's computation (see attention_f32.h) on ELEM, over keys and values of CACHE_ELEM. */
static inline ELEM_TARGET int attention(const ELEM *q, attention_strides q_strides, const CACHE_ELEM *k,
                                        const CACHE_ELEM *v, attention_strides kv_strides, const int *q_start,
                                        const int *kv_len, ELEM *out, attention_strides out_strides, long B, long H,
                                        long T, long S, long D) {
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
            const CACHE_ELEM *kh = k + b * kv_strides.b + h * kv_strides.h;
            const CACHE_ELEM *vh = v + b * kv_strides.b + h * kv_strides.h;
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
