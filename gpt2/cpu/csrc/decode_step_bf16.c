/* A whole decode step of a bf16 model in one call, token ids to logits: 1 to 16 rows of one new token each (see
 * gpt2/cpu/decode_step.py), on CPUs with avx512_bf16: decode_loop.h over bf16.
 *
 * The weights, the KV cache and the logits are bf16; the matmuls are small_batch_matmul_bf16's (bf16 inputs, fp32
 * sums, each output rounded to bf16 once). Between them the step works in fp32: the residual stream stays fp32 for
 * the whole step, each LayerNorm is taken of it in fp32 and rounded to bf16 as the next matmul's input, and
 * attention widens the bf16 query, keys and values to fp32 and rounds its output once. torch's bf16 ops round the
 * residual stream to bf16 after every add, so this step's logits are nearer the fp32 model's than theirs.
 */
#include "bf16.h"
#include "decode_weights.h"
#include "small_batch_matmul.h"

#if VLANES == 16 /* an AVX-512 build (simd.h); elsewhere the function below refuses every call */
#define ELEM uint16_t
#define ELEM_TARGET BF16_TARGET
#define load_elem(p) vload_bf16(p)
#define store_elem(p, v) vstore_bf16(p, v)
/* attention.h's bf16 rounding: the query is scaled as it is widened to fp32, and the values are summed in one set of
 * accumulators. */
#define ATTENTION_SCALES_QUERY 1
#define ATTENTION_VALUE_CHAINS 1

#define STEP_BLOCK_WEIGHTS block_weights_bf16
#define STEP_MODEL_WEIGHTS model_weights_bf16
static inline BF16_TARGET int matmul(const uint16_t *W, const uint16_t *b, const uint16_t *X, uint16_t *Y, long m,
                                     long rows, long cols, int gelu) {
    return small_batch_matmul_bf16(W, X, b, Y, m, rows, cols, gelu);
}
#include "decode_loop.h"
#endif

/* One decode step of B rows of a bf16 model, token ids to logits (B, vocab), as decode_step_f32, its n_embd a
 * multiple of 32; -1 in a build without AVX-512 (see DECODE_STEP_ENTRY). */
DECODE_STEP_ENTRY(decode_step_bf16, decode_step, model_weights_bf16, uint16_t, uint16_t, 32)
