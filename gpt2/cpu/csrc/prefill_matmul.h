/* Y = X W^T + b in fp32 for any number of input rows (m), optionally through gelu_new: a prefill chunk's matmuls on
 * the CPU, called by gpt2/cpu/prefill_matmul.py, defined in prefill_matmul_f32.c.
 * X is (m, cols), W (rows, cols), Y (m, rows), all row-major fp32; cols a multiple of 16; b (rows,) or NULL.
 * Returns 0, or -1 for m < 1 or cols not a multiple of 16 (nothing written). */
#pragma once

int prefill_matmul_f32(const float *W, const float *X, const float *b, float *Y, long m, long rows, long cols,
                       int gelu);
