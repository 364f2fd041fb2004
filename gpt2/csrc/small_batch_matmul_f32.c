/* The small-batch matmul (small_batch_matmul.h) for callers outside this library: gpt2/small_batch_matmul.py. */
#include "small_batch_matmul.h"

int small_batch_matmul_f32(const float *W, const float *X, const float *b, float *Y, long m, long rows, long cols,
                           int gelu) {
    return small_batch_matmul(W, X, b, Y, m, rows, cols, gelu);
}
