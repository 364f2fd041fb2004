/* exp, GPT-2's gelu_new and a 16-way horizontal sum on fp32 AVX-512 vectors, for the CPU kernels in this folder. */
#pragma once
#include <immintrin.h>

/* e^x: x = n ln2 + r with |r| <= ln2/2, e^r by Cephes expf's degree-6 polynomial (about 1 ulp), times 2^n by
 * scalef (which saturates to inf or 0 past fp32's range, as expf does). */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.8f)), _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* ln2 in two parts: r stays exact */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* gelu_new(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed as x / (1 + e^(-2u)) (the same
 * function: 0.5 (1 + tanh(u)) = 1 / (1 + e^(-2u))), which needs one exp and has no cancellation near u = 0. */
static inline __m512 gelu512(__m512 x) {
    const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    const __m512 inner = _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f), inner);
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_mul_ps(_mm512_set1_ps(-2.0f), u))));
}

/* A mask of the first min(n, 16) lanes. */
static inline __mmask16 first_lanes(long n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

/* The 16 sums of a[0..15]: lane i of the result is the sum of a[i]'s lanes. Four levels of pairwise shuffles and
 * adds, 15 adds in all, where 16 _mm512_reduce_add_ps would take 64 (the reduction ends every block of dot products
 * in the kernels' inner loops). */
static inline __m512 sum16(const __m512 a[16]) {
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
