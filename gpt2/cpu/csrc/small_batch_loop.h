/* The loop the small-batch matmul kernels share (small_batch_matmul_f32.c, _bf16.c, _int8.c): each source
 * defines `block` (the products of one block of W rows with one pass of input rows) for its types (TW for W, TX for
 * X, TB for b, TY for Y), then instantiates SMALL_BATCH_KERNELS and calls SMALL_BATCH_DISPATCH. X_STRIDE is the
 * distance between input rows in X's elements: cols for rows of values, 1 for an array of row descriptors (the int8
 * kernel's quantized rows).
 *
 * One kernel per block shape (SHAPE_1 .. SHAPE_MANY below): W_ROWS rows of W per block and PASS input rows per
 * pass, constants so that the accumulators are registers. m input rows take ceil(m / PASS) passes over each block,
 * the last one of fewer rows when PASS does not divide m; a partial block (the last rows of W) takes the same loop.
 * The threads (OpenMP, the same runtime as torch's) split the blocks in contiguous runs, each next run a share of the
 * blocks left (schedule(guided): half the blocks, then a quarter, ...), so that the two finish together where one
 * runs slower; a static split into halves waited for the slower one at every matmul (measured: docs/performance.md).
 */
#pragma once
#include "simd.h"

#define SMALL_BATCH_KERNEL(TW, TX, TB, TY, X_STRIDE, ATTR, NAME, W_ROWS, PASS)                                 \
    static ATTR void NAME(const TW *W, const TX *X, const TB *b, TY *Y, long m, long rows, long cols,          \
                          int gelu) {                                                                          \
        _Static_assert(W_ROWS <= VLANES, "a block's outputs of one input row fill at most one vector");        \
        const long blocks = (rows + W_ROWS - 1) / W_ROWS;                                                      \
        _Pragma("omp parallel for schedule(guided)")                                                           \
        for (long blk = 0; blk < blocks; blk++) {                                                              \
            const long r = blk * W_ROWS, n_w = rows - r < W_ROWS ? rows - r : W_ROWS;                          \
            for (long j = 0; j < m; j += PASS) {                                                               \
                const long n_x = m - j < PASS ? m - j : PASS;                                                  \
                const TB *bias = b ? b + r : 0;                                                                \
                if (n_w == W_ROWS && n_x == PASS)                                                              \
                    block(W + r * cols, X + j * (X_STRIDE), bias, Y + j * rows + r, W_ROWS, PASS, cols, rows,  \
                          gelu);                                                                               \
                else                                                                                           \
                    block(W + r * cols, X + j * (X_STRIDE), bias, Y + j * rows + r, n_w, n_x, cols, rows, gelu); \
            }                                                                                                  \
        }                                                                                                      \
    }

/* Block shapes (W rows per block, input rows per pass) for 1, 2, 3 and more input rows, the fastest with 2 threads.
 * With AVX-512: one W row a block for one input row, so that W is read as one sequential stream (prefetched
 * ONE_ROW_PREFETCH_BYTES ahead by each source's `block`); 8 W rows for two input rows, 4 above. From four input rows
 * on, a block of W is read from memory once and from L1 again for each further pass. AVX2 has 16 vector registers to
 * AVX-512's 32, so its accumulators (W rows x input rows) stay at most 12. A block's W rows are at most VLANES:
 * gelu_new is applied to a block's outputs as one vector. Each shape may be set with -D; gpt2/cpu/build.py does so
 * per CPU (TUNED_FLAGS). Chosen: the defaults below (measured: docs/performance.md). */
/* A block of one W row reads W as one sequential stream (its rows are contiguous), which `block` prefetches into L2
 * this many bytes ahead, whatever the rows' length: 2 KiB, where a row ahead (DialoGPT's 3-12 KiB) was too far for
 * the longer rows (measured: docs/performance.md). */
#ifndef ONE_ROW_PREFETCH_BYTES
#define ONE_ROW_PREFETCH_BYTES 2048
#endif

#if VLANES == 16
#define DEFAULT_SHAPE_1 1, 1
#define DEFAULT_SHAPE_2 8, 2
#define DEFAULT_SHAPE_3 4, 3
#define DEFAULT_SHAPE_MANY 4, 4
#else
#define DEFAULT_SHAPE_1 8, 1
#define DEFAULT_SHAPE_2 4, 2
#define DEFAULT_SHAPE_3 4, 3
#define DEFAULT_SHAPE_MANY 3, 4
#endif
#ifndef SHAPE_1
#define SHAPE_1 DEFAULT_SHAPE_1
#endif
#ifndef SHAPE_2
#define SHAPE_2 DEFAULT_SHAPE_2
#endif
#ifndef SHAPE_3
#define SHAPE_3 DEFAULT_SHAPE_3
#endif
#ifndef SHAPE_MANY
#define SHAPE_MANY DEFAULT_SHAPE_MANY
#endif

/* SHAPE: W_ROWS, PASS, whether given as one macro or (already expanded) as two arguments */
#define SMALL_BATCH_KERNEL_OF(TW, TX, TB, TY, X_STRIDE, ATTR, NAME, ...)                                     \
    SMALL_BATCH_KERNEL(TW, TX, TB, TY, X_STRIDE, ATTR, NAME, __VA_ARGS__)
/* The kernels with shapes of their own for one input row and for four or more (ONE_ROW, MANY: each a macro of
 * W_ROWS, PASS), and SHAPE_2's and SHAPE_3's. */
#define SMALL_BATCH_KERNELS_WITH(TW, TX, TB, TY, X_STRIDE, ATTR, ONE_ROW, MANY)                                 \
    SMALL_BATCH_KERNEL_OF(TW, TX, TB, TY, X_STRIDE, ATTR, matmul_1, ONE_ROW)                                   \
    SMALL_BATCH_KERNEL_OF(TW, TX, TB, TY, X_STRIDE, ATTR, matmul_2, SHAPE_2)                                   \
    SMALL_BATCH_KERNEL_OF(TW, TX, TB, TY, X_STRIDE, ATTR, matmul_3, SHAPE_3)                                   \
    SMALL_BATCH_KERNEL_OF(TW, TX, TB, TY, X_STRIDE, ATTR, matmul_many, MANY)
#define SMALL_BATCH_KERNELS(TW, TX, TB, TY, X_STRIDE, ATTR)                                                    \
    SMALL_BATCH_KERNELS_WITH(TW, TX, TB, TY, X_STRIDE, ATTR, SHAPE_1, SHAPE_MANY)

/* Runs the kernel for m input rows (1..SMALL_BATCH_MAX_ROWS, checked by the caller) and returns 0. */
#define SMALL_BATCH_DISPATCH(W, X, b, Y, m, rows, cols, gelu)                                                  \
    switch (m) {                                                                                               \
    case 1: matmul_1(W, X, b, Y, m, rows, cols, gelu); return 0;                                               \
    case 2: matmul_2(W, X, b, Y, m, rows, cols, gelu); return 0;                                               \
    case 3: matmul_3(W, X, b, Y, m, rows, cols, gelu); return 0;                                               \
    default: matmul_many(W, X, b, Y, m, rows, cols, gelu); return 0;                                           \
    }
