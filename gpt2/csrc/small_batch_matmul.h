/* Y = X W^T + b in fp32 for 1 to 16 input rows (m), optionally through gelu_new: the decode-step matmuls on the CPU,
 * called by gpt2/small_batch_matmul.py and decode_blocks_f32.c, defined in small_batch_matmul_f32.c.
 * X is (m, cols), W (rows, cols), Y (m, rows), all row-major fp32; cols a multiple of 16; b (rows,) or NULL.
 * Returns 0, or -1 for an m outside 1..SMALL_BATCH_MAX_ROWS (nothing written). */
#pragma once

#define SMALL_BATCH_MAX_ROWS 16 /* above, oneDNN's GEMM is as fast (see gpt2/small_batch_matmul.py) */

int small_batch_matmul_f32(const float *W, const float *X, const float *b, float *Y, long m, long rows, long cols,
                           int gelu);
