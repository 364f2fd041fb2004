/* A whole decode step of an fp32 model in one call, token ids to logits: 1 to 16 rows of one new token each (see
 * gpt2/cpu/decode_step.py), decode_loop.h's step on fp32 weights. */
#include "decode_f32.h"

/* One decode step of B rows, token ids to logits (B, vocab), as decode_loop.h's decode_step; n_embd a multiple of 16.
 * Returns 0; step_refusal's status for what it does not take (nothing done); -2 when out of memory. */
int decode_step_f32(const model_weights *m, const long *tokens, long B, float *k_cache, float *v_cache, long max_len,
                    const int *slot, float *logits) {
    const int refusal = step_refusal(m->C, m->H, 16, tokens, slot, B, m->vocab, m->n_positions, max_len);
    return refusal ? refusal : decode_step(m, tokens, B, k_cache, v_cache, max_len, slot, logits);
}
