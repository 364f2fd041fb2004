/* Y = X W^T + b in fp32 for 1 to 16 input rows (m), optionally through gelu_new: the decode-step matmuls on the CPU,
 * called by gpt2/cpu/small_batch_matmul.py and the decode steps (decode_loop.h), defined in small_batch_matmul_f32.c.
 * X is (m, cols), W (rows, cols), Y (m, rows), all row-major fp32; cols a multiple of 16; b (rows,) or NULL.
 * Returns 0, or -1 for an m outside 1..SMALL_BATCH_MAX_ROWS (nothing written). */
#pragma once
#include <stdint.h>

#include "int8.h"

#define SMALL_BATCH_MAX_ROWS 16 /* above, oneDNN's GEMM is as fast (see gpt2/cpu/small_batch_matmul.py) */

int small_batch_matmul_f32(const float *W, const float *X, const float *b, float *Y, long m, long rows, long cols,
                           int gelu);

/* The same in bf16 (X, W, b, Y bf16 as uint16_t; fp32 accumulation; cols a multiple of 32), for CPUs with
 * avx512_bf16, defined in small_batch_matmul_bf16.c. Returns 0, or -1 for such an m or cols (nothing written). */
int small_batch_matmul_bf16(const uint16_t *W, const uint16_t *X, const uint16_t *b, uint16_t *Y, long m, long rows,
                            long cols, int gelu);

/* Y (m, rows) fp32 = X (m, cols) fp32 times int8 W (rows, cols) with its rows' scales, biases and sums (w_rows), each
 * input row quantized to uint8 on its own (cols a multiple of 64), for CPUs with avx512_vnni, defined in
 * small_batch_matmul_int8.c. Returns 0; -1 for such an m or cols, or a build without AVX-512 (nothing written); -2
 * when out of memory. */
int small_batch_matmul_int8(const int8_t *W, const int8_row *w_rows, const float *X, float *Y, long m, long rows,
                            long cols, int gelu);
