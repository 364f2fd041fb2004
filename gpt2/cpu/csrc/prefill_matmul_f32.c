/* Y = X W^T + b in fp32 for many input rows, optionally through gelu_new (see prefill_matmul.h).
 *
 * Each tile is TILE_X rows of X against 4 rows of W (4 x 4 with AVX-512, 3 x 4 with AVX2: simd.h): one vector
 * accumulator of dot products along cols per pair, the sums then taken together across lanes (vsum_lanes), so both
 * operands are read as they lie, with no packed copy of W. The threads (OpenMP, torch's runtime) split W's rows; each
 * keeps a block of 4 W rows in L1 and walks a chunk of X's rows (CHUNK_BYTES of X) past it from L2, so W streams from
 * memory once per chunk. While a thread works on one block, it prefetches its next one into L1 a few lines per tile: in
 * a prefill each weight comes from DRAM, and without it each block's first tiles waited on memory. Inputs wider than
 * WHOLE_COLS go through in slices, each tile adding its partial sums into Y: a whole 4-row block of 3072 floats would
 * not stay in L1 beside the X rows streaming past it. Chosen: both, the prefetch into L1 (measured:
 * docs/performance.md). Where this beats oneDNN's GEMM on an AMD EPYC (Zen 4 with AVX-512, Zen 2 with AVX2), and so
 * where it is used: see gpt2/cpu/prefill_matmul.py.
 */
#include "prefill_matmul.h"
#include "simd_math.h"

#define CHUNK_BYTES (512 * 1024) /* of X per pass over W: half of Zen 4's L2 (measured: docs/performance.md) */
#define WHOLE_COLS 1024 /* inputs up to this wide are summed whole; wider ones in slices of SLICE_COLS, added up in Y */
#define SLICE_COLS 512
#define TILE_W 4 /* W rows of a tile */
#define ROWS_PER_VECTOR (VLANES / TILE_W) /* X rows whose TILE_W sums each fill one vector, lane 4j + i */
#if VLANES == 16
#define TILE_X 4 /* X rows of a tile: 16 accumulators, one vector of sums */
#else
#define TILE_X 3 /* 12 accumulators, the 3 rows of x and a row of W fill AVX2's 16 registers */
#endif
#define TILE_VECTORS ((TILE_X + ROWS_PER_VECTOR - 1) / ROWS_PER_VECTOR) /* vectors of a tile's sums */

#if VLANES == 16
/* The 4 x 4 outputs of a full tile at y (rows ldy apart) as one vector, lane 4j + i holding y[j * ldy + i]; n_rows
 * is always ROWS_PER_VECTOR (4) here. */
static inline vfloat load_tile(const float *y, long ldy, long n_rows) {
    (void)n_rows;
    return _mm512_insertf32x4(_mm512_insertf32x4(_mm512_insertf32x4(_mm512_castps128_ps512(_mm_loadu_ps(y)),
                                                                    _mm_loadu_ps(y + ldy), 1),
                                                 _mm_loadu_ps(y + 2 * ldy), 2),
                              _mm_loadu_ps(y + 3 * ldy), 3);
}
static inline void store_tile(float *y, long ldy, vfloat out, long n_rows) {
    (void)n_rows;
    _mm_storeu_ps(y, _mm512_castps512_ps128(out));
    _mm_storeu_ps(y + ldy, _mm512_extractf32x4_ps(out, 1));
    _mm_storeu_ps(y + 2 * ldy, _mm512_extractf32x4_ps(out, 2));
    _mm_storeu_ps(y + 3 * ldy, _mm512_extractf32x4_ps(out, 3));
}
/* b[0..3] in each X row's lanes */
static inline vfloat broadcast_tile_row(const float *b) { return _mm512_broadcast_f32x4(_mm_loadu_ps(b)); }
#else
/* The same for a vector of 2 rows' outputs, or of 1 (the tile's third row: the upper lanes are zeros, not stored). */
static inline vfloat load_tile(const float *y, long ldy, long n_rows) {
    const __m128 row0 = _mm_loadu_ps(y);
    return n_rows == 2 ? _mm256_insertf128_ps(_mm256_castps128_ps256(row0), _mm_loadu_ps(y + ldy), 1)
                       : _mm256_insertf128_ps(_mm256_setzero_ps(), row0, 0);
}
static inline void store_tile(float *y, long ldy, vfloat out, long n_rows) {
    _mm_storeu_ps(y, _mm256_castps256_ps128(out));
    if (n_rows == 2) _mm_storeu_ps(y + ldy, _mm256_extractf128_ps(out, 1));
}
static inline vfloat broadcast_tile_row(const float *b) { return _mm256_broadcast_ps((const __m128 *)b); }
#endif

/* Y[j, i] (+)= X[j] . w[i] over one slice of cols for i < n_w <= TILE_W, j < n_x <= TILE_X (lane 4j + i of the sums),
 * the rows of w and x ld apart: the first slice adds b[i], the last applies gelu_new, the others add to Y. */
static inline __attribute__((always_inline)) void tile(const float *w, const float *x, const float *b, float *y,
                                                      long n_w, long n_x, long cols, long ld, long ldy, int first,
                                                      int last_gelu) {
    vfloat acc[TILE_W * TILE_X];
    for (int t = 0; t < TILE_W * TILE_X; t++) acc[t] = vzero();
    for (long k = 0; k < cols; k += VLANES) {
        vfloat xk[TILE_X];
        for (long j = 0; j < n_x; j++) xk[j] = vload(x + j * ld + k);
        for (long i = 0; i < n_w; i++) {
            const vfloat wk = vload(w + i * ld + k);
            for (long j = 0; j < n_x; j++) acc[4 * j + i] = vfmadd(wk, xk[j], acc[4 * j + i]);
        }
    }
    vfloat sums[TILE_VECTORS]; /* vector g: the sums of X rows from g * ROWS_PER_VECTOR on */
    for (int g = 0; g < TILE_VECTORS; g++) {
        vfloat part[VLANES];
        for (int t = 0; t < VLANES; t++) part[t] = g * VLANES + t < TILE_W * TILE_X ? acc[g * VLANES + t] : vzero();
        sums[g] = vsum_lanes(part);
    }
    if (n_w == TILE_W && n_x == TILE_X) {
        for (int g = 0; g < TILE_VECTORS; g++) {
            const long row = g * ROWS_PER_VECTOR;
            const long n_rows = TILE_X - row < ROWS_PER_VECTOR ? TILE_X - row : ROWS_PER_VECTOR;
            vfloat out = sums[g];
            if (!first)
                out = vadd(out, load_tile(y + row * ldy, ldy, n_rows));
            else if (b)
                out = vadd(out, broadcast_tile_row(b));
            if (last_gelu) out = vgelu(out);
            store_tile(y + row * ldy, ldy, out, n_rows);
        }
        return;
    }
    float outs[TILE_VECTORS * VLANES] = {0};
    for (long j = 0; j < n_x; j++)
        for (long i = 0; i < n_w; i++) outs[4 * j + i] = first ? (b ? b[i] : 0.0f) : y[j * ldy + i];
    for (int g = 0; g < TILE_VECTORS; g++) {
        const vfloat out = vadd(sums[g], vload(outs + g * VLANES));
        vstore(outs + g * VLANES, last_gelu ? vgelu(out) : out);
    }
    for (long j = 0; j < n_x; j++)
        for (long i = 0; i < n_w; i++) y[j * ldy + i] = outs[4 * j + i];
}

int prefill_matmul_f32(const float *W, const float *X, const float *b, float *Y, long m, long rows, long cols,
                       int gelu) {
    if (m < 1 || cols % 16) return -1;
    const long blocks = (rows + TILE_W - 1) / TILE_W;
#pragma omp parallel
    for (long k0 = 0, slice = cols <= WHOLE_COLS ? cols : SLICE_COLS; k0 < cols; k0 += slice) {
        const long width = cols - k0 < slice ? cols - k0 : slice;
        const int first = k0 == 0, last_gelu = gelu && k0 + width == cols;
        const long fit = CHUNK_BYTES / (width * (long)sizeof(float)) / TILE_X * TILE_X;
        const long chunk_rows = fit > TILE_X ? fit : TILE_X;
        for (long chunk = 0; chunk < m; chunk += chunk_rows) {
            const long end = chunk + chunk_rows < m ? chunk + chunk_rows : m;
#pragma omp for schedule(static) nowait /* the same W blocks per thread in every slice and chunk: no two write one Y */
            for (long blk = 0; blk < blocks; blk++) {
                const long r = blk * TILE_W, n_w = rows - r < TILE_W ? rows - r : TILE_W;
                /* the slice of the thread's next block of W, 64-byte lines of it spread over this block's tiles */
                const char *next = (const char *)(W + (r + TILE_W) * cols + k0);
                const long row_lines = width * (long)sizeof(float) / 64;
                const long next_lines = r + TILE_W < rows ? TILE_W * row_lines : 0;
                const long tiles = (end - chunk + TILE_X - 1) / TILE_X;
                const long lines_per_tile = (next_lines + tiles - 1) / tiles;
                for (long j = chunk; j < end; j += TILE_X) {
                    const long n_x = end - j < TILE_X ? end - j : TILE_X;
                    const long line0 = (j - chunk) / TILE_X * lines_per_tile;
                    for (long line = line0; line < line0 + lines_per_tile && line < next_lines; line++)
                        _mm_prefetch(next + line / row_lines * cols * (long)sizeof(float) + line % row_lines * 64,
                                     _MM_HINT_T0);
                    const float *bias = b ? b + r : 0;
                    float *y = Y + j * rows + r;
                    const float *w = W + r * cols + k0, *x = X + j * cols + k0;
                    if (n_w == TILE_W && n_x == TILE_X)
                        tile(w, x, bias, y, TILE_W, TILE_X, width, cols, rows, first, last_gelu);
                    else
                        tile(w, x, bias, y, n_w, n_x, width, cols, rows, first, last_gelu);
                }
            }
        }
    }
    return 0;
}
