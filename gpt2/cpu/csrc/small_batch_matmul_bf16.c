/* Y = X W^T + b in bf16 for 1 to 16 input rows, optionally through gelu_new (see small_batch_matmul.h): the
 * decode-step matmuls of a bf16 model (gpt2/cpu/bf16_linear.py).
 *
 * X is (m, cols), W (rows, cols), Y (m, rows), all row-major bf16; cols a multiple of 32; b may be NULL. The
 * products are avx512_bf16 dot products (pairs of bf16 multiplied exactly, summed into fp32); each output gets
 * the bias and gelu_new in fp32 and is rounded to bf16 once, to nearest even, as oneDNN's bf16 matmul does. The
 * loop is the fp32 kernel's (small_batch_matmul_f32.c): the threads split W's rows, each walks a block of W rows
 * at once with one accumulator per (input row, W row), and the next block is prefetched as this one streams (a
 * block of one W row: its stream, ONE_ROW_PREFETCH_BYTES ahead).
 * Only called where the CPU has avx512_bf16 (bf16.h).
 */
#include "bf16.h"
#include "simd_math.h"
#include "small_batch_loop.h"
#include "small_batch_matmul.h"

#if VLANES == 16 /* an AVX-512 build (simd.h); elsewhere the function below refuses every call */
/* Y[j, i] = X[j] . w[i] + b[i] for i < n_w (W rows of this block), j < n_x (input rows of this pass). */
static inline BF16_TARGET __attribute__((always_inline)) void block(const uint16_t *w, const uint16_t *X,
                                                                   const uint16_t *b, uint16_t *Y, long n_w,
                                                                   long n_x, long cols, long y_stride, int gelu) {
    __m512 acc[16];
    for (long j = 0; j < n_w * n_x; j++) acc[j] = _mm512_setzero_ps();
    for (long k = 0; k < cols; k += 32) {
        __m512bh wk[16];
        const uint16_t *next = n_w == 1 ? w + k + ONE_ROW_PREFETCH_BYTES / sizeof(uint16_t) /* this stream */
                                        : w + n_w * cols + k * n_w; /* the next block, a line per W row per step */
        for (long i = 0; i < n_w; i++) {
            _mm_prefetch((const char *)(next + i * 32), _MM_HINT_T2); /* 32 bf16: one line */
            wk[i] = (__m512bh)_mm512_loadu_si512(w + i * cols + k);
        }
        for (long j = 0; j < n_x; j++) {
            const __m512bh xk = (__m512bh)_mm512_loadu_si512(X + j * cols + k);
            for (long i = 0; i < n_w; i++) acc[j * n_w + i] = _mm512_dpbf16_ps(acc[j * n_w + i], wk[i], xk);
        }
    }
    const __mmask16 lanes = first_lanes(n_w);
    for (long j = 0; j < n_x; j++) {
        float sums[16];
        for (long i = 0; i < n_w; i++) sums[i] = _mm512_reduce_add_ps(acc[j * n_w + i]);
        __m512 y = _mm512_maskz_loadu_ps(lanes, sums);
        if (b) y = _mm512_add_ps(y, load_bf16(b, lanes));
        if (gelu) y = vgelu(y);
        store_bf16(Y + j * y_stride, lanes, y);
    }
}

SMALL_BATCH_KERNELS(uint16_t, uint16_t, uint16_t, uint16_t, cols, BF16_TARGET)
#endif

int small_batch_matmul_bf16(const uint16_t *W, const uint16_t *X, const uint16_t *b, uint16_t *Y, long m, long rows,
                            long cols, int gelu) {
#if VLANES == 16
    if (m < 1 || m > SMALL_BATCH_MAX_ROWS || cols % 32) return -1;
    SMALL_BATCH_DISPATCH(W, X, b, Y, m, rows, cols, gelu)
#else
    (void)W, (void)X, (void)b, (void)Y, (void)m, (void)rows, (void)cols, (void)gelu;
    return -1;
#endif
}
