/* A bf16 KV cache under an fp32 decode step (decode_step_f32_kv_bf16.c, decode_step_int8_kv_bf16.c): the
 * CACHE_ELEM, load_cache and write_cache of kv_elem.h. Each key and value is rounded to bf16 as torch's
 * .to(torch.bfloat16) rounds it (to nearest even, NaN kept a NaN) when written, and widened to fp32, exactly, when
 * read. In plain integer vector instructions of either build (simd.h), so unlike bf16.h it needs no avx512_bf16.
 */
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include "simd.h"

#if VLANES == 16

/* The VLANES bf16 at p, widened to fp32: a bf16 is the upper half of an fp32. */
static inline vfloat vload_from_bf16(const uint16_t *p) {
    const __m512i halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(halves, 16));
}

/* v rounded to bf16 and stored at p (VLANES of them). */
static inline void vstore_to_bf16(uint16_t *p, vfloat v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(rounded));
}

#else /* the same in AVX2 */

static inline vfloat vload_from_bf16(const uint16_t *p) {
    const __m256i halves = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(halves, 16));
}

static inline void vstore_to_bf16(uint16_t *p, vfloat v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    /* each lane is below 2^16, so packing with unsigned saturation keeps it; packus works within 128-bit halves */
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(rounded),
                                                    _mm256_extracti128_si256(rounded, 1)));
}

#endif

/* n fp32 at src (n a multiple of VLANES) rounded to bf16 into dst: a new key or value written to the cache. */
static inline void write_bf16(uint16_t *dst, const float *src, long n) {
    for (long i = 0; i < n; i += VLANES) vstore_to_bf16(dst + i, vload(src + i));
}

#define CACHE_ELEM uint16_t
#define load_cache(p) vload_from_bf16(p)
#define write_cache(dst, src, n) write_bf16(dst, src, n)
