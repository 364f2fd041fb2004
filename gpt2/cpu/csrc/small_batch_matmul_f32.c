/* Y = X W^T + b in fp32 for 1 to 16 input rows, optionally through gelu_new (see small_batch_matmul.h).
 *
 * X is (m, cols), W (rows, cols), Y (m, rows), all row-major; cols a multiple of 16; b may be NULL. Such a
 * matmul streams W once and is bound by memory, so the threads (OpenMP, the same runtime as torch's) split
 * W's rows, and each walks its blocks of W rows (with AVX-512, one W row for one input row: a sequential stream)
 * with one vector accumulator (simd.h) per (input row, W row), summed once at the end. From 4 input rows on, a
 * block of W is read from memory once and from L1 again for each further pass of input rows, so the accumulators
 * stay in registers. The loop over blocks and passes, and the block sizes, are small_batch_loop.h's.
 */
#include "simd_math.h"
#include "small_batch_loop.h"
#include "small_batch_matmul.h"

/* While a block of W rows streams in, the next block (contiguous after it) is prefetched into L2 (_MM_HINT_T2), one
 * cache line per W row at each step, so the whole next block is requested by the time this one ends (past W's
 * end nothing faults); a block of one W row prefetches its stream ONE_ROW_PREFETCH_BYTES ahead (see
 * small_batch_loop.h). Each W row of a DialoGPT matrix is only 48-256 lines, too short a stream for the hardware
 * prefetcher to run ahead of on its own. Chosen: the next block, rather than each W row's own stream ahead, and again
 * in every pass over a block (measured: docs/performance.md). */

/* Y[j, i] = X[j] . w[i] + b[i] for i < n_w (W rows of this block), j < n_x (input rows of this pass). */
static inline __attribute__((always_inline)) void block(const float *w, const float *X, const float *b, float *Y,
                                                       long n_w, long n_x, long cols, long y_stride, int gelu) {
    vfloat acc[16];
    for (long j = 0; j < n_w * n_x; j++) acc[j] = vzero();
    for (long k = 0; k < cols; k += VLANES) {
        vfloat wk[16];
        const float *next = n_w == 1 ? w + k + ONE_ROW_PREFETCH_BYTES / sizeof(float) /* this stream, further on */
                                     : w + n_w * cols + k * n_w; /* the next block, n_w vectors further at each step */
        for (long i = 0; i < n_w; i++) {
            if (VLANES == 16 || 2 * i < n_w) /* the lines of those n_w vectors: n_w of 16 floats, n_w / 2 of 8 */
                _mm_prefetch((const char *)(next + i * 16), _MM_HINT_T2); /* 16 floats: one line */
            wk[i] = vload(w + i * cols + k);
        }
        for (long j = 0; j < n_x; j++) {
            const vfloat xk = vload(X + j * cols + k);
            for (long i = 0; i < n_w; i++) acc[j * n_w + i] = vfmadd(wk[i], xk, acc[j * n_w + i]);
        }
    }
    for (long j = 0; j < n_x; j++) {
        float *y = Y + j * y_stride;
        for (long i = 0; i < n_w; i++) y[i] = vreduce_add(acc[j * n_w + i]) + (b ? b[i] : 0.0f);
        if (gelu) { /* the block's n_w <= VLANES outputs of this row, still in L1 */
            const vmask lanes = first_lanes(n_w);
            vmask_store(y, lanes, vgelu(vmaskz_load(lanes, y)));
        }
    }
}

SMALL_BATCH_KERNELS(float, float, float, float, cols, )

/* One input row over rows longer than LONG_ROW_COLS (the MLP's c_proj, 3072-5120 columns) takes LONG_ROW_SHAPE_1's
 * blocks, several W rows at once: one W row a block reads x once per W line, and an x of 12 KiB or more does not
 * stay in L1 beside the W stream. Chosen: 8 W rows; bf16, whose x is half the bytes, keeps SHAPE_1 (measured:
 * docs/performance.md). */
#define LONG_ROW_COLS 2048
#define LONG_ROW_SHAPE_1 8, 1
SMALL_BATCH_KERNEL_OF(float, float, float, float, cols, , matmul_1_long_rows, LONG_ROW_SHAPE_1)

int small_batch_matmul_f32(const float *W, const float *X, const float *b, float *Y, long m, long rows, long cols,
                           int gelu) {
    if (m < 1 || m > SMALL_BATCH_MAX_ROWS) return -1;
    if (m == 1 && cols > LONG_ROW_COLS) {
        matmul_1_long_rows(W, X, b, Y, m, rows, cols, gelu);
        return 0;
    }
    SMALL_BATCH_DISPATCH(W, X, b, Y, m, rows, cols, gelu)
}
