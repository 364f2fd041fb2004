/* decode_loop.h on fp32 weights, for the fp32 step's two entries: decode_blocks_f32.c (the blocks of gpt2/model.py's
 * forward) and decode_step_f32.c (the whole step). */
#pragma once
#include "decode_weights.h"
#include "elem_f32.h"
#include "small_batch_matmul.h"

#define STEP_BLOCK_WEIGHTS block_weights
#define STEP_MODEL_WEIGHTS model_weights
static inline int matmul(const float *W, const float *b, const float *X, float *Y, long m, long rows, long cols,
                         int gelu) {
    return small_batch_matmul_f32(W, X, b, Y, m, rows, cols, gelu);
}
#include "decode_loop.h"
