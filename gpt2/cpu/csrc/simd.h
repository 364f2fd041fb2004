/* The fp32 vector the CPU kernels in this folder are written in: AVX-512 (16 lanes) where the library is built with
 * -mavx512f, else AVX2 with FMA (8 lanes); gpt2/cpu/build.py picks the flags from the CPU. Each operation is the
 * one intrinsic (or short sequence) of that instruction set, so the AVX-512 build compiles to what the kernels did
 * when they were written in its intrinsics. A mask (vmask) selects the first lanes of a vector: loads through one
 * read nothing past those lanes, and stores write nothing past them. */
#pragma once
#include <immintrin.h>

#if defined(__AVX512F__)

#define VLANES 16
typedef __m512 vfloat;
typedef __mmask16 vmask;

static inline vfloat vzero(void) { return _mm512_setzero_ps(); }
static inline vfloat vset1(float x) { return _mm512_set1_ps(x); }
static inline vfloat vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vfloat v) { _mm512_storeu_ps(p, v); }
static inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
static inline vfloat vsub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
static inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
static inline vfloat vdiv(vfloat a, vfloat b) { return _mm512_div_ps(a, b); }
static inline vfloat vmin(vfloat a, vfloat b) { return _mm512_min_ps(a, b); }
static inline vfloat vmax(vfloat a, vfloat b) { return _mm512_max_ps(a, b); }
static inline vfloat vfmadd(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); } /* a b + c */
static inline vfloat vfnmadd(vfloat a, vfloat b, vfloat c) { return _mm512_fnmadd_ps(a, b, c); } /* c - a b */
static inline float vreduce_add(vfloat v) { return _mm512_reduce_add_ps(v); }
static inline float vreduce_max(vfloat v) { return _mm512_reduce_max_ps(v); }
static inline vfloat vround(vfloat x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* p 2^n for n a whole number in [-150, 128]: scalef saturates to inf or 0 past fp32's range, as expf does */
static inline vfloat vscale2(vfloat p, vfloat n) { return _mm512_scalef_ps(p, n); }

/* The first min(n, 16) lanes. */
static inline vmask first_lanes(long n) { return n >= 16 ? (vmask)0xFFFF : (vmask)((1u << n) - 1); }
static inline vfloat vmaskz_load(vmask m, const float *p) { return _mm512_maskz_loadu_ps(m, p); }
static inline void vmask_store(float *p, vmask m, vfloat v) { _mm512_mask_storeu_ps(p, m, v); }
static inline vfloat vmaskz_mov(vmask m, vfloat v) { return _mm512_maskz_mov_ps(m, v); }
/* max(a, b) in the masked lanes, a in the others */
static inline vfloat vmask_max(vmask m, vfloat a, vfloat b) { return _mm512_mask_max_ps(a, m, a, b); }

#elif defined(__AVX2__) && defined(__FMA__)

#define VLANES 8
typedef __m256 vfloat;
typedef __m256i vmask; /* all ones in a selected lane, zero in the others */

static inline vfloat vzero(void) { return _mm256_setzero_ps(); }
static inline vfloat vset1(float x) { return _mm256_set1_ps(x); }
static inline vfloat vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vfloat v) { _mm256_storeu_ps(p, v); }
static inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
static inline vfloat vsub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
static inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
static inline vfloat vdiv(vfloat a, vfloat b) { return _mm256_div_ps(a, b); }
static inline vfloat vmin(vfloat a, vfloat b) { return _mm256_min_ps(a, b); }
static inline vfloat vmax(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
static inline vfloat vfmadd(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
static inline vfloat vfnmadd(vfloat a, vfloat b, vfloat c) { return _mm256_fnmadd_ps(a, b, c); }
static inline float vreduce_add(vfloat v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float vreduce_max(vfloat v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline vfloat vround(vfloat x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* p 2^n for n a whole number in [-150, 128], as two exponent-field scalings 2^(n/2) 2^(n - n/2), each a normal
 * fp32 power of two (-75..64), so that results below fp32's normal range come out subnormal or 0 as expf's do */
static inline vfloat vscale2(vfloat p, vfloat n) {
    const __m256i whole = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(whole, 1);
    const __m256i rest = _mm256_sub_epi32(whole, half);
    const __m256i bias = _mm256_set1_epi32(127);
    const vfloat a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const vfloat b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, a), b);
}

/* The first min(n, 8) lanes. */
static inline vmask first_lanes(long n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n >= 8 ? 8 : (int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vfloat vmaskz_load(vmask m, const float *p) { return _mm256_maskload_ps(p, m); }
static inline void vmask_store(float *p, vmask m, vfloat v) { _mm256_maskstore_ps(p, m, v); }
static inline vfloat vmaskz_mov(vmask m, vfloat v) { return _mm256_and_ps(_mm256_castsi256_ps(m), v); }
static inline vfloat vmask_max(vmask m, vfloat a, vfloat b) {
    return _mm256_blendv_ps(a, _mm256_max_ps(a, b), _mm256_castsi256_ps(m));
}

#else
#error "the CPU kernels need AVX-512 (-mavx512f) or AVX2 with FMA (-mavx2 -mfma)"
#endif
