/* The loop the small-batch matmul kernels share (small_batch_matmul_f32.c, small_batch_matmul_bf16.c): each source
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
 * runs slower. A static split into halves waited for the slower one at every matmul: on an AMD EPYC (Zen 4), a
 * plain read of 494 MB split in halves, the master thread finished 5-7% after the other (median of 15), 2-4% with
 * guided runs; paired against the static split, median of 21-81, the whole decode step took 0.915 / 0.945 of its
 * time (fp32 small, batch 1), 0.930 (medium), 0.974 at batch 2 and 8, bf16 0.974, int8 0.974, the same logits. */
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

/* Block shapes (W rows per block, input rows per pass) for 1, 2, 3 and more input rows, measured fastest with 2
 * threads. With AVX-512: one W row a block for one input row, so that W is read as one sequential stream
 * (prefetched ONE_ROW_PREFETCH_BYTES ahead by each source's `block`); 8 W rows for two input rows, 4 above. From four
 * input rows on, a block of W is read from memory once and from L1 again for each further pass.
 * - Intel Xeon (AVX-512, AMX; 2 MiB L2 a core), a one-row matmul over one 494 MB matrix (DialoGPT-small's decode
 *   weights), median of 17 interleaved: 14.7 ms with 1 W row a block, 17.9 with 2, 18.0 with 4, 17.5 with 16 (MKL's
 *   GEMV 15.5; without the prefetch 1 W row 16.9, 8 rows 16.8); the whole fp32 step (small) 15.9 against 18.1 with
 *   16, medium 49.0 against 53.2, bf16 (small) 11.8 against 13.0; 8 input rows unchanged (25.6 against 25.8 ms).
 * - AMD EPYC (Zen 4), paired against 16 W rows a block: the whole fp32 step at batch 1 (40 cached tokens), median
 *   of 31-41 rounds in two runs, took 0.969 / 0.988 of the time (small) and 0.957 / 0.952 (medium), the same
 *   logits; bf16 1.009 / 0.994, within the noise. Against a plain read of the same bytes (one vector add a 64-byte
 *   line), paired, median of 21-31: the one-row matmul over small's 494 MB took 0.955 / 0.965 of its time with 1 W
 *   row a block, 1.043 / 0.998 with 16; over medium's 1.24 GB 0.942 against 1.008; in a slow stretch all 1.001.
 * AVX2 has 16 vector registers to AVX-512's 32, so its accumulators (W rows x input rows) stay at most 12: on an AMD
 * EPYC (Zen 2), all DialoGPT-small decode matmuls in turn, median of 7 interleaved, 3 W rows x 4 input rows against
 * 4 x 3 took 24.4 / 26.4 ms at 4 rows, 27.7 / 31.9 at 8, 35.1 / 45.0 at 16 (2 x 4: 24.1 / 34.6 / 55.3); 1-3 rows
 * took 20-24 ms with 4 to 12 W rows a block, within the noise (oneDNN: 41.5 ms for 1 row, 73.2 for 2, 96.6 for 4,
 * 119 for 16). A block's W rows are at most VLANES: gelu_new is applied to a block's outputs as one vector. Each
 * shape may be set with -D; gpt2/cpu_kernels.py does so per CPU (TUNED_FLAGS): on an AMD EPYC of Zen 5, a one-row
 * matmul over 494 MB took 2.3-7.4% less time with 4-10 W rows a block than with 16, and the whole step 3.9-5.4%
 * less with 8 (median of 31-41 interleaved; one W row a block was not measured there); 2 and 8+ input rows kept
 * their shapes (B=8: 4 x 4 16.5 ms a step against 17.0-17.4 for 2 x 4, 3 x 4 and 8 x 2; B=2: 8 x 2 and 4 x 2
 * within the noise). */
/* A block of one W row reads W as one sequential stream (its rows are contiguous), which `block` prefetches into L2
 * this many bytes ahead, whatever the rows' length. A row ahead, DialoGPT's 3-12 KiB, was too far for the longer
 * rows: on an AMD EPYC (Zen 4), 2 threads, a one-row matmul over 24 copies of a 768 x 3072 matrix (the MLP's c_proj
 * of DialoGPT-small) read 50.7-53.7 GB/s prefetching 1-4 KiB ahead and 40.5 at 12 KiB; 3072 x 768: 56.2-57.1 at 1-3
 * KiB, 52.6 at 4, 41.0 at 12 (one run's fastest of 14). The whole decode step against a row ahead, paired, median of
 * 41-61: fp32 medium 0.894-0.914 of its time with 0.5-2 KiB (2 KiB: 0.899 and 0.928 in two runs), small 0.981 with
 * 2 KiB, bf16 medium 0.962, the same logits. */
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
