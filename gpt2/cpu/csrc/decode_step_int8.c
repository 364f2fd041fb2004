/* A whole decode step of an int8 model in one call, token ids to logits: 1 to 16 rows of one new token each (see
 * gpt2/cpu/decode_step.py), on CPUs with avx512_vnni: decode_int8.h's step over an fp32 KV cache.
 */
#include "decode_int8.h"

/* One decode step of B rows of an int8 model, token ids to logits (B, vocab), as decode_step_f32, its n_embd a
 * multiple of 64; -1 in a build without AVX-512 (see DECODE_STEP_ENTRY). */
DECODE_STEP_ENTRY(decode_step_int8, decode_step, model_weights_int8, float, float, 64)
