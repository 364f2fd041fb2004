/* y = W x + b in fp32 for one input row: the batch-1 decode matmul on the CPU (see gpt2/cpu_gemv.py).
 *
 * W is (rows, cols) row-major, cols a multiple of 16; b may be NULL. The threads (OpenMP, the same runtime
 * as torch's) split the rows; each walks ROWS_PER_BLOCK rows of W at once, so that many sequential streams
 * are in flight, with one AVX-512 accumulator per row, and sums each accumulator once at the end.
 */
#include <immintrin.h>

#define ROWS_PER_BLOCK 16 /* 16 measured fastest of 2/4/8/16 (Zen 4, 2 threads): more streams in flight */

static inline __attribute__((always_inline)) void dot_rows(const float *w, const float *x, const float *b, float *y, long n_rows, long cols) {
    __m512 acc[ROWS_PER_BLOCK];
    for (long i = 0; i < n_rows; i++) acc[i] = _mm512_setzero_ps();
    for (long k = 0; k < cols; k += 16) {
        const __m512 xk = _mm512_loadu_ps(x + k);
        for (long i = 0; i < n_rows; i++) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(w + i * cols + k), xk, acc[i]);
    }
    for (long i = 0; i < n_rows; i++) y[i] = _mm512_reduce_add_ps(acc[i]) + (b ? b[i] : 0.0f);
}

void gemv_f32(const float *W, const float *x, const float *b, float *y, long rows, long cols) {
    const long blocks = (rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
    #pragma omp parallel for schedule(static)
    for (long blk = 0; blk < blocks; blk++) {
        const long r = blk * ROWS_PER_BLOCK;
        const long n = rows - r < ROWS_PER_BLOCK ? rows - r : ROWS_PER_BLOCK;
        if (n == ROWS_PER_BLOCK) /* a constant row count: the accumulators stay in registers */
            dot_rows(W + r * cols, x, b ? b + r : 0, y + r, ROWS_PER_BLOCK, cols);
        else
            dot_rows(W + r * cols, x, b ? b + r : 0, y + r, n, cols);
    }
}
