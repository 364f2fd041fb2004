/* exp, GPT-2's gelu_new and the horizontal sums of VLANES vectors at once, on simd.h's vectors, for the CPU kernels
 * in this folder. */
#pragma once
#include "simd.h"

/* e^x: x = n ln2 + r with |r| <= ln2/2, e^r by Cephes expf's degree-6 polynomial (about 1 ulp), times 2^n by
 * vscale2 (which saturates to inf or 0 past fp32's range, as expf does). */
static inline vfloat vexp(vfloat x) {
    x = vmax(vmin(x, vset1(88.8f)), vset1(-104.0f));
    const vfloat n = vround(vmul(x, vset1(1.44269504088896341f)));
    vfloat r = vfnmadd(n, vset1(0.693359375f), x); /* ln2 in two parts: r stays exact */
    r = vfnmadd(n, vset1(-2.12194440e-4f), r);
    vfloat p = vset1(1.9875691500e-4f);
    p = vfmadd(p, r, vset1(1.3981999507e-3f));
    p = vfmadd(p, r, vset1(8.3334519073e-3f));
    p = vfmadd(p, r, vset1(4.1665795894e-2f));
    p = vfmadd(p, r, vset1(1.6666665459e-1f));
    p = vfmadd(p, r, vset1(5.0000001201e-1f));
    p = vfmadd(p, vmul(r, r), vadd(r, vset1(1.0f)));
    return vscale2(p, n);
}

/* gelu_new(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed as x / (1 + e^(-2u)) (the same
 * function: 0.5 (1 + tanh(u)) = 1 / (1 + e^(-2u))), which needs one exp and has no cancellation near u = 0. */
static inline vfloat vgelu(vfloat x) {
    const vfloat x3 = vmul(vmul(x, x), x);
    const vfloat inner = vfmadd(vset1(0.044715f), x3, x);
    const vfloat u = vmul(vset1(0.7978845608028654f), inner);
    return vdiv(x, vadd(vset1(1.0f), vexp(vmul(vset1(-2.0f), u))));
}

#if VLANES == 16
/* The 16 sums of a[0..15]: lane i of the result is the sum of a[i]'s lanes. Four levels of pairwise shuffles and
 * adds, 15 adds in all, where 16 _mm512_reduce_add_ps would take 64 (the reduction ends every block of dot products
 * in the kernels' inner loops). */
static inline vfloat vsum_lanes(const vfloat a[16]) {
    __m512 halves[8], quarters[4], eighths[2];
    for (int i = 0; i < 8; i++) /* lanes 0-7: a[2i]'s two 256-bit halves added; lanes 8-15: a[2i+1]'s */
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                                  _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++) /* 128-bit lane j: 4 partial sums of a[4i + j] */
        quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0x88),
                                    _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++) /* per 128-bit lane j: 2 partial sums of a[8i + j], then 2 of a[8i + 4 + j] */
        eighths[i] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], 0x44),
                                   _mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], 0xEE));
    /* lane 4j + i holds the sum of a[4i + j] */
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(eighths[0], eighths[1], 0x88),
                                      _mm512_shuffle_ps(eighths[0], eighths[1], 0xDD));
    return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), sums);
}
#else
/* The 8 sums of a[0..7]: lane i of the result is the sum of a[i]'s lanes. Two levels of horizontal adds within
 * each 128-bit half, then the halves added across: 7 adds where 8 reductions would take 24. */
static inline vfloat vsum_lanes(const vfloat a[8]) {
    /* per 128-bit half h: lane i sums half h of a[i] (i < 4), then of a[4 + i] */
    const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
}
#endif
