/* A whole decode step of an int8 model in one call, token ids to logits: 1 to 16 rows of one new token each (see
 * gpt2/cpu/decode_step.py), on CPUs with avx512_vnni.
 *
 * The block linears and the lm_head are int8 (gpt2/cpu/int8_linear.py's Int8Linear), their matmuls
 * small_batch_matmul_int8's (each input row quantized on its own); everything else is fp32 as in the fp32 step:
 * decode_loop.h over elem_f32.h.
 */
#include "decode_weights.h"
#include "int8.h"
#include "small_batch_matmul.h"

#if VLANES == 16 /* an AVX-512 build (simd.h); elsewhere the function below refuses every call */
#include "elem_f32.h"

#define STEP_BLOCK_WEIGHTS block_weights_int8
#define STEP_MODEL_WEIGHTS model_weights_int8
static inline int matmul(const int8_t *W, const int8_row *b, const float *X, float *Y, long m, long rows, long cols,
                         int gelu) {
    return small_batch_matmul_int8(W, b, X, Y, m, rows, cols, gelu);
}
#include "decode_loop.h"
#endif

/* One decode step of B rows of an int8 model, token ids to logits (B, vocab), as decode_step_f32, its n_embd a
 * multiple of 64; -1 in a build without AVX-512 (see DECODE_STEP_ENTRY). */
DECODE_STEP_ENTRY(decode_step_int8, decode_step, model_weights_int8, float, 64)
