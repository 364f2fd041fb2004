/* An fp16 (IEEE half) KV cache under an fp32 decode step (decode_step_f32_kv_f16.c, decode_step_int8_kv_f16.c): the
 * CACHE_ELEM, load_cache and write_cache of kv_elem.h. Each key and value is rounded to fp16 as torch's
 * .to(torch.float16) rounds it (to nearest even; past fp16's range, inf) when written, and widened to fp32, exactly,
 * when read: AVX-512's conversions, or F16C's in the AVX2 build (gpt2/cpu/build.py compiles it with -mf16c and takes
 * only CPUs that have it; every AVX2 CPU does).
 */
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include "simd.h"

#define F16_ROUNDING (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

#if VLANES == 16
/* The VLANES fp16 at p, widened to fp32; v rounded to fp16 and stored at p. */
static inline vfloat vload_from_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
static inline void vstore_to_f16(uint16_t *p, vfloat v) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(v, F16_ROUNDING));
}
#else /* the same in AVX2 with F16C */
static inline vfloat vload_from_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline void vstore_to_f16(uint16_t *p, vfloat v) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, F16_ROUNDING));
}
#endif

/* n fp32 at src (n a multiple of VLANES) rounded to fp16 into dst: a new key or value written to the cache. */
static inline void write_f16(uint16_t *dst, const float *src, long n) {
    for (long i = 0; i < n; i += VLANES) vstore_to_f16(dst + i, vload(src + i));
}

#define CACHE_ELEM uint16_t
#define load_cache(p) vload_from_f16(p)
#define write_cache(dst, src, n) write_f16(dst, src, n)
