/* The loop the small-batch matmul kernels share (small_batch_matmul_f32.c, small_batch_matmul_bf16.c): each source
 * defines `block` (the products of one block of W rows with one pass of input rows) for its element type T, then
 * instantiates SMALL_BATCH_KERNELS and calls SMALL_BATCH_DISPATCH.
 *
 * One kernel per block shape: W_ROWS rows of W per block and PASS input rows per pass, constants so that the
 * accumulators are registers. m input rows take ceil(m / PASS) passes over each block, the last one of fewer rows
 * when PASS does not divide m; a partial block (the last rows of W) takes the same loop. The threads (OpenMP, the
 * same runtime as torch's) split the blocks, each thread a contiguous run of them. */
#pragma once

#define SMALL_BATCH_KERNEL(T, ATTR, W_ROWS, PASS)                                                              \
    static ATTR void matmul_##W_ROWS##x##PASS(const T *W, const T *X, const T *b, T *Y, long m, long rows,    \
                                              long cols, int gelu) {                                           \
        const long blocks = (rows + W_ROWS - 1) / W_ROWS;                                                      \
        _Pragma("omp parallel for schedule(static)")                                                           \
        for (long blk = 0; blk < blocks; blk++) {                                                              \
            const long r = blk * W_ROWS, n_w = rows - r < W_ROWS ? rows - r : W_ROWS;                          \
            for (long j = 0; j < m; j += PASS) {                                                               \
                const long n_x = m - j < PASS ? m - j : PASS;                                                  \
                const T *bias = b ? b + r : 0;                                                                 \
                if (n_w == W_ROWS && n_x == PASS)                                                              \
                    block(W + r * cols, X + j * cols, bias, Y + j * rows + r, W_ROWS, PASS, cols, rows, gelu); \
                else                                                                                           \
                    block(W + r * cols, X + j * cols, bias, Y + j * rows + r, n_w, n_x, cols, rows, gelu);     \
            }                                                                                                  \
        }                                                                                                      \
    }

/* Block sizes measured fastest on an AMD EPYC (Zen 4), 2 threads: 16 W rows for one input row, 8 for two, 4 above;
 * from four input rows on, a block of W is read from memory once and from L1 again for each further pass. */
#define SMALL_BATCH_KERNELS(T, ATTR)                                                                           \
    SMALL_BATCH_KERNEL(T, ATTR, 16, 1)                                                                         \
    SMALL_BATCH_KERNEL(T, ATTR, 8, 2)                                                                          \
    SMALL_BATCH_KERNEL(T, ATTR, 4, 3)                                                                          \
    SMALL_BATCH_KERNEL(T, ATTR, 4, 4)

/* Runs the kernel for m input rows (1..SMALL_BATCH_MAX_ROWS, checked by the caller) and returns 0. */
#define SMALL_BATCH_DISPATCH(W, X, b, Y, m, rows, cols, gelu)                                                  \
    switch (m) {                                                                                               \
    case 1: matmul_16x1(W, X, b, Y, m, rows, cols, gelu); return 0;                                            \
    case 2: matmul_8x2(W, X, b, Y, m, rows, cols, gelu); return 0;                                             \
    case 3: matmul_4x3(W, X, b, Y, m, rows, cols, gelu); return 0;                                             \
    default: matmul_4x4(W, X, b, Y, m, rows, cols, gelu); return 0;                                            \
    }
