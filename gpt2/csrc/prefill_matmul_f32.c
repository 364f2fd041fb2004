/* Y = X W^T + b in fp32 for many input rows, optionally through gelu_new (see prefill_matmul.h).
 *
 * Each tile is 4 rows of X against 4 rows of W: 16 AVX-512 accumulators of dot products along cols, the 16 sums then
 * taken together across lanes (sum16), so both operands are read as they lie, with no packed copy of W. The threads
 * (OpenMP, torch's runtime) split W's rows; each keeps a block of 4 W rows in L1 and walks a chunk of X's rows
 * (CHUNK_BYTES of X) past it from L2, so W streams from memory once per chunk. While a thread works on one block,
 * it prefetches its next one into L1 a few lines per tile: in a prefill each weight comes from DRAM, and without it
 * each block's first tiles waited on memory (DialoGPT-small's qkv matmul at 256 rows 57.5 -> 51.4 ms over the 12
 * layers; into L2 only, 52.2). Inputs wider than WHOLE_COLS go through in slices, each tile adding its partial sums
 * into Y: a whole 4-row block of 3072 floats would not stay in L1 beside the X rows streaming past it (64 rows of
 * 3072 x 768: 129 -> 177 GFLOP/s). Where this beats oneDNN's GEMM on an AMD EPYC (Zen 4), and so where it is used: see
 * gpt2/prefill_matmul.py.
 */
#include <immintrin.h>

#include "prefill_matmul.h"
#include "simd_math.h"

#define CHUNK_BYTES (512 * 1024) /* of X per pass over W: half of this CPU's L2 (1 MiB measured slower) */
#define WHOLE_COLS 1024 /* inputs up to this wide are summed whole; wider ones in slices of SLICE_COLS, added up in Y */
#define SLICE_COLS 512

/* Y[j, i] (+)= X[j] . w[i] over one slice of cols for i < n_w and j < n_x, both at most 4 (lane 4j + i of the sums),
 * the rows of w and x ld apart: the first slice adds b[i], the last applies gelu_new, the others add to Y. */
static inline __attribute__((always_inline)) void tile(const float *w, const float *x, const float *b, float *y,
                                                      long n_w, long n_x, long cols, long ld, long ldy, int first,
                                                      int last_gelu) {
    __m512 acc[16];
    for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
    for (long k = 0; k < cols; k += 16) {
        __m512 xk[4];
        for (long j = 0; j < n_x; j++) xk[j] = _mm512_loadu_ps(x + j * ld + k);
        for (long i = 0; i < n_w; i++) {
            const __m512 wk = _mm512_loadu_ps(w + i * ld + k);
            for (long j = 0; j < n_x; j++) acc[4 * j + i] = _mm512_fmadd_ps(wk, xk[j], acc[4 * j + i]);
        }
    }
    __m512 out = sum16(acc);
    if (n_w == 4 && n_x == 4) {
        if (!first)
            out = _mm512_add_ps(out, _mm512_insertf32x4(_mm512_insertf32x4(_mm512_insertf32x4(
                _mm512_castps128_ps512(_mm_loadu_ps(y)), _mm_loadu_ps(y + ldy), 1), _mm_loadu_ps(y + 2 * ldy), 2),
                _mm_loadu_ps(y + 3 * ldy), 3));
        else if (b)
            out = _mm512_add_ps(out, _mm512_broadcast_f32x4(_mm_loadu_ps(b)));
        if (last_gelu) out = gelu512(out);
        _mm_storeu_ps(y, _mm512_castps512_ps128(out));
        _mm_storeu_ps(y + ldy, _mm512_extractf32x4_ps(out, 1));
        _mm_storeu_ps(y + 2 * ldy, _mm512_extractf32x4_ps(out, 2));
        _mm_storeu_ps(y + 3 * ldy, _mm512_extractf32x4_ps(out, 3));
        return;
    }
    float sums[16] = {0};
    for (long j = 0; j < n_x; j++)
        for (long i = 0; i < n_w; i++) sums[4 * j + i] = first ? (b ? b[i] : 0.0f) : y[j * ldy + i];
    out = _mm512_add_ps(out, _mm512_loadu_ps(sums));
    _mm512_storeu_ps(sums, last_gelu ? gelu512(out) : out);
    for (long j = 0; j < n_x; j++)
        for (long i = 0; i < n_w; i++) y[j * ldy + i] = sums[4 * j + i];
}

int prefill_matmul_f32(const float *W, const float *X, const float *b, float *Y, long m, long rows, long cols,
                       int gelu) {
    if (m < 1 || cols % 16) return -1;
    const long blocks = (rows + 3) / 4;
#pragma omp parallel
    for (long k0 = 0, slice = cols <= WHOLE_COLS ? cols : SLICE_COLS; k0 < cols; k0 += slice) {
        const long width = cols - k0 < slice ? cols - k0 : slice;
        const int first = k0 == 0, last_gelu = gelu && k0 + width == cols;
        const long fit = CHUNK_BYTES / (width * (long)sizeof(float)) / 4 * 4, chunk_rows = fit > 4 ? fit : 4;
        for (long chunk = 0; chunk < m; chunk += chunk_rows) {
            const long end = chunk + chunk_rows < m ? chunk + chunk_rows : m;
#pragma omp for schedule(static) nowait /* the same W blocks per thread in every slice and chunk: no two write one Y */
            for (long blk = 0; blk < blocks; blk++) {
                const long r = blk * 4, n_w = rows - r < 4 ? rows - r : 4;
                /* the slice of the thread's next block of W, 64-byte lines of it spread over this block's tiles */
                const char *next = (const char *)(W + (r + 4) * cols + k0);
                const long row_lines = width * (long)sizeof(float) / 64, next_lines = r + 4 < rows ? 4 * row_lines : 0;
                const long tiles = (end - chunk + 3) / 4;
                const long lines_per_tile = (next_lines + tiles - 1) / tiles;
                for (long j = chunk; j < end; j += 4) {
                    const long n_x = end - j < 4 ? end - j : 4;
                    const long line0 = (j - chunk) / 4 * lines_per_tile;
                    for (long line = line0; line < line0 + lines_per_tile && line < next_lines; line++)
                        _mm_prefetch(next + line / row_lines * cols * (long)sizeof(float) + line % row_lines * 64,
                                     _MM_HINT_T0);
                    const float *bias = b ? b + r : 0;
                    float *y = Y + j * rows + r;
                    const float *w = W + r * cols + k0, *x = X + j * cols + k0;
                    if (n_w == 4 && n_x == 4)
                        tile(w, x, bias, y, 4, 4, width, cols, rows, first, last_gelu);
                    else
                        tile(w, x, bias, y, n_w, n_x, width, cols, rows, first, last_gelu);
                }
            }
        }
    }
    return 0;
}
