/* decode_loop.h with int8 linears, for the int8 step's entries: decode_step_int8.c (over an fp32 KV cache) and
 * decode_step_int8_kv_bf16.c / _kv_f16.c (over a bf16 or fp16 one, which include kv_bf16.h or kv_f16.h first).
 *
 * The block linears and the lm_head are int8 (gpt2/cpu/int8_linear.py's Int8Linear), their matmuls
 * small_batch_matmul_int8's (each input row quantized on its own); everything else is fp32 as in the fp32 step:
 * decode_loop.h over elem_f32.h. In AVX-512 builds only (the int8 matmul's): elsewhere the entries refuse every call
 * (DECODE_STEP_ENTRY).
 */
#pragma once
#include "decode_weights.h"
#include "int8.h"
#include "small_batch_matmul.h"

#if VLANES == 16
#include "elem_f32.h"

#define STEP_BLOCK_WEIGHTS block_weights_int8
#define STEP_MODEL_WEIGHTS model_weights_int8
static inline int matmul(const int8_t *W, const int8_row *b, const float *X, float *Y, long m, long rows, long cols,
                         int gelu) {
    return small_batch_matmul_int8(W, b, X, Y, m, rows, cols, gelu);
}
#include "decode_loop.h"
#endif
