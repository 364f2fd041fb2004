/* Y = X W^T + b for 1 to 16 fp32 input rows against int8 weights, optionally through gelu_new: the decode-step matmuls
 * of an int8 model (gpt2/cpu/int8_linear.py, decode_step_int8.c), on CPUs with avx512_vnni (int8.h).
 *
 * W is (rows, cols) int8, row-major, with each row's scale, bias and sum of its int8 values beside it (int8_row);
 * X (m, cols) and Y (m, rows) fp32; cols a multiple of 64. Each input row is quantized on its own to uint8 with a
 * zero point, by the rule torch's dynamic int8 linear (fbgemm) applies to a whole input, so a one-row input gets the
 * values it gets there (a batch of rows, each its own scale, is nearer fp32 than there). The products are VNNI's
 * (4 uint8 x int8 products summed into int32 at a time), exact; y = x_scale w_scale (sum - x_zero_point w_sum) + b
 * in fp32. The loop is the fp32 kernel's (small_batch_matmul_f32.c, small_batch_loop.h) over 64 int8 a vector.
 */
#include <math.h>
#include <stdlib.h>

#include "int8.h"
#include "simd_math.h"
#include "small_batch_loop.h"
#include "small_batch_matmul.h"

#if VLANES == 16 /* an AVX-512 build (simd.h); elsewhere the function below refuses every call */
/* fbgemm's (torch's ChooseQuantizationParams, reduce_range off) scale and zero point for values in [lo, hi]. */
static void choose_qparams(float lo, float hi, float *scale, int32_t *zero_point) {
    const float small_scale = 6.1e-5f; /* the least scale it takes */
    lo = fminf(lo, 0.0f), hi = fmaxf(hi, 0.0f);
    double s = ((double)hi - lo) / 255;
    if ((float)s == 0.0f || isinf(1.0f / (float)s)) s = 0.1;
    if (s < small_scale) { /* widen [lo, hi] to what the least scale spans */
        const float amplifier = small_scale / (float)s;
        if (lo == 0.0f) hi = small_scale * 255;
        else if (hi == 0.0f) lo = -small_scale * 255;
        else lo *= amplifier, hi *= amplifier;
        s = small_scale;
    }
    const double from_lo = -lo / s, from_hi = 255 - hi / s; /* the zero point from either end, and its error */
    const double zp = -fabs(lo / s) < 255 - fabs(hi / s) ? from_lo : from_hi;
    *zero_point = zp < 0 ? 0 : zp > 255 ? 255 : (int32_t)nearbyint(zp);
    *scale = (float)s;
}

/* Row x (cols fp32) quantized to q (cols uint8): round(x / scale) + zero_point, clamped to [0, 255]. */
static INT8_TARGET void quantize_row(const float *x, long cols, uint8_t *q, quantized_row *row) {
    __m512 lo = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(-INFINITY);
    for (long c = 0; c < cols; c += 16) {
        const __m512 v = _mm512_loadu_ps(x + c);
        lo = _mm512_min_ps(lo, v), hi = _mm512_max_ps(hi, v);
    }
    choose_qparams(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), &row->scale, &row->zero_point);
    const __m512 inverse = _mm512_set1_ps(1.0f / row->scale), zero_point = _mm512_set1_ps((float)row->zero_point);
    for (long c = 0; c < cols; c += 16) {
        __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + c), inverse),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, zero_point), _mm512_setzero_ps()), _mm512_set1_ps(255));
        _mm_storeu_si128((__m128i *)(q + c), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    }
    row->q = q;
}

/* The lane sums of a[0..15] as one vector (lane i: a[i]'s sum), folding pairs of vectors together a level at a time:
 * 46 shuffles and adds, where 16 reductions of one vector each take about 9 instructions. */
static inline INT8_TARGET __attribute__((always_inline)) __m512i lane_sums_16(const __m512i *a) {
    __m512i halves[8], quarters[4], eighths[2]; /* each: the partial sums of 2, 4, 8 of a's vectors */
    for (int i = 0; i < 8; i++) /* 128-bit lanes 0-1: a[2i]'s low half + high half; 2-3: a[2i + 1]'s */
        halves[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(a[2 * i], a[2 * i + 1], 0x44),
                                     _mm512_shuffle_i32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++) /* 128-bit lane l: a[4i + l]'s four partial sums */
        quarters[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(halves[2 * i], halves[2 * i + 1], 0x88),
                                       _mm512_shuffle_i32x4(halves[2 * i], halves[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)
        eighths[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(quarters[2 * i], quarters[2 * i + 1]),
                                      _mm512_unpackhi_epi32(quarters[2 * i], quarters[2 * i + 1]));
    /* lane 4l + e: the sum of a[4e + l] */
    const __m512i sums = _mm512_add_epi32(_mm512_unpacklo_epi64(eighths[0], eighths[1]),
                                          _mm512_unpackhi_epi64(eighths[0], eighths[1]));
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), sums);
}

/* Y[j, i] = X[j] . w[i] dequantized, + bias, for i < n_w (W rows of this block), j < n_x (input rows of this pass).
 * One input row reads the block's W rows one after the other (they are contiguous: one sequential stream, prefetched
 * ONE_ROW_PREFETCH_BYTES ahead, as fp32's one-row blocks), each into one accumulator; more rows read them side by
 * side, each W vector against every input row, while the next block is prefetched a line per W row at each step.
 * Chosen: the one-row order, and lane_sums_16 for a block's 16 sums (measured: docs/performance.md). */
static inline INT8_TARGET __attribute__((always_inline)) void block(const int8_t *w, const quantized_row *X,
                                                                   const int8_row *p, float *Y, long n_w, long n_x,
                                                                   long cols, long y_stride, int gelu) {
    __m512i acc[16];
    if (n_x == 1) {
        for (long i = 0; i < n_w; i++) {
            const int8_t *row = w + i * cols;
            __m512i sum = _mm512_setzero_si512();
            for (long k = 0; k < cols; k += 64) {
                _mm_prefetch((const char *)(row + k + ONE_ROW_PREFETCH_BYTES), _MM_HINT_T2);
                sum = _mm512_dpbusd_epi32(sum, _mm512_loadu_si512(X[0].q + k), _mm512_loadu_si512(row + k));
            }
            acc[i] = sum;
        }
    } else {
        for (long j = 0; j < n_w * n_x; j++) acc[j] = _mm512_setzero_si512();
        for (long k = 0; k < cols; k += 64) {
            __m512i wk[16];
            const int8_t *next = w + n_w * cols + k * n_w; /* the next block, a line per W row per step */
            for (long i = 0; i < n_w; i++) {
                _mm_prefetch((const char *)(next + i * 64), _MM_HINT_T2); /* 64 int8: one line */
                wk[i] = _mm512_loadu_si512(w + i * cols + k);
            }
            for (long j = 0; j < n_x; j++) {
                const __m512i xk = _mm512_loadu_si512(X[j].q + k);
                for (long i = 0; i < n_w; i++) acc[j * n_w + i] = _mm512_dpbusd_epi32(acc[j * n_w + i], xk, wk[i]);
            }
        }
    }
    const __mmask16 lanes = first_lanes(n_w);
    for (long j = 0; j < n_x; j++) {
        int32_t sums[16];
        if (n_w == 16) _mm512_storeu_si512(sums, lane_sums_16(acc + j * n_w));
        else
            for (long i = 0; i < n_w; i++) sums[i] = _mm512_reduce_add_epi32(acc[j * n_w + i]);
        float y[16];
        for (long i = 0; i < n_w; i++) {
            const int32_t sum = sums[i] - X[j].zero_point * (int32_t)p[i].sum;
            y[i] = (float)sum * (X[j].scale * p[i].scale) + p[i].bias;
        }
        __m512 v = _mm512_maskz_loadu_ps(lanes, y);
        if (gelu) v = vgelu(v);
        _mm512_mask_storeu_ps(Y + j * y_stride, lanes, v);
    }
}

/* One input row takes 16 W rows a block, whatever SHAPE_1 is (fp32's and bf16's one W row with AVX-512): a W row of
 * int8 is a quarter of an fp32 one's bytes, so a one-row block spends more of its time on its reduction and outputs,
 * and only 16 takes lane_sums_16. Chosen: 16 (measured: docs/performance.md). */
#ifndef INT8_SHAPE_1
#define INT8_SHAPE_1 16, 1
#endif
/* Four or more input rows take passes of two over blocks of 8 W rows (SHAPE_2's), not fp32's 4 x 4 (measured:
 * docs/performance.md). */
#ifndef INT8_SHAPE_MANY
#define INT8_SHAPE_MANY 8, 2
#endif
SMALL_BATCH_KERNELS_WITH(int8_t, quantized_row, int8_row, float, 1, INT8_TARGET, INT8_SHAPE_1, INT8_SHAPE_MANY)

static INT8_TARGET int matmul(const int8_t *W, const quantized_row *X, const int8_row *b, float *Y, long m, long rows,
                              long cols, int gelu) {
    SMALL_BATCH_DISPATCH(W, X, b, Y, m, rows, cols, gelu)
}

static INT8_TARGET int quantized_matmul(const int8_t *W, const int8_row *w_rows, const float *X, float *Y, long m,
                                        long rows, long cols, int gelu) {
    uint8_t *q = malloc(m * cols);
    if (!q) return -2;
    quantized_row x_rows[SMALL_BATCH_MAX_ROWS];
    for (long j = 0; j < m; j++) quantize_row(X + j * cols, cols, q + j * cols, x_rows + j);
    matmul(W, x_rows, w_rows, Y, m, rows, cols, gelu);
    free(q);
    return 0;
}
#endif

int small_batch_matmul_int8(const int8_t *W, const int8_row *w_rows, const float *X, float *Y, long m, long rows,
                            long cols, int gelu) {
#if VLANES == 16
    if (m < 1 || m > SMALL_BATCH_MAX_ROWS || cols % 64) return -1;
    return quantized_matmul(W, w_rows, X, Y, m, rows, cols, gelu);
#else
    (void)W, (void)w_rows, (void)X, (void)Y, (void)m, (void)rows, (void)cols, (void)gelu;
    return -1;
#endif
}
