/* bf16 <-> fp32 vectors for the AVX-512 build's bf16 kernels (small_batch_matmul_bf16.c, decode_step_bf16.c), which
 * run only where the CPU has avx512_bf16 (gpt2.cpu.build.bf16_available): so only their functions are compiled for it
 * (BF16_TARGET). A bf16 is the upper half of an fp32. */
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include "simd.h"

#if VLANES == 16
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* fp32 values of the lanes' bf16 at p (the other lanes 0). */
static inline BF16_TARGET __m512 load_bf16(const uint16_t *p, __mmask16 lanes) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, p)), 16));
}

/* The lanes of v rounded to bf16 (to nearest even) and stored at p. */
static inline BF16_TARGET void store_bf16(uint16_t *p, __mmask16 lanes, __m512 v) {
    _mm256_mask_storeu_epi16(p, lanes, (__m256i)_mm512_cvtneps_pbh(v));
}

/* The same for a whole vector (VLANES bf16). */
static inline BF16_TARGET __m512 vload_bf16(const uint16_t *p) { return load_bf16(p, (__mmask16)0xFFFF); }
static inline BF16_TARGET void vstore_bf16(uint16_t *p, __m512 v) { store_bf16(p, (__mmask16)0xFFFF, v); }
#endif
