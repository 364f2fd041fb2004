/* A whole decode step of an fp32 model in one call, token ids to logits: 1 to 16 rows of one new token each (see
 * gpt2/cpu/decode_step.py), decode_loop.h's step on fp32 weights over an fp32 KV cache. */
#include "decode_f32.h"

DECODE_STEP_F32_ENTRY(decode_step_f32)
