/* The int8 kernels' types (small_batch_matmul_int8.c, decode_step_int8.c), which run only where the CPU has
 * avx512_vnni (gpt2.cpu.build.int8_available): so only their functions are compiled for it (INT8_TARGET). */
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include "simd.h"

#define INT8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

/* One W row's scale (its int8 values times it are the weights), its bias (0 for none) and the sum of its int8
 * values (exact in fp32: at most 127 x cols), as gpt2/cpu/int8_linear.py's Int8Linear keeps them: a (rows, 3) fp32
 * tensor. */
typedef struct {
    float scale, bias, sum;
} int8_row;

/* One input row quantized: x = scale (q - zero_point), q in [0, 255]. */
typedef struct {
    const uint8_t *q;
    float scale;
    int32_t zero_point;
} quantized_row;
