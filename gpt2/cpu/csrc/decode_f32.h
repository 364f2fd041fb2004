/* decode_loop.h on fp32 weights, for the fp32 step's entries: decode_blocks_f32.c (the blocks of gpt2/model.py's
 * forward), decode_step_f32.c (the whole step), and decode_step_f32_kv_bf16.c / _kv_f16.c (the whole step over a bf16
 * or fp16 KV cache, which include kv_bf16.h or kv_f16.h first). */
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

/* Defines NAME(m, tokens, B, k_cache, v_cache, max_len, slot, logits), an fp32 model's whole decode step of B rows
 * over a KV cache of CACHE_ELEM (kv_elem.h), token ids to logits (B, vocab), as decode_loop.h's decode_step; n_embd a
 * multiple of 16. It returns 0; step_refusal's status for what it does not take (nothing done); -2 when out of
 * memory. */
#define DECODE_STEP_F32_ENTRY(NAME)                                                                                \
    int NAME(const model_weights *m, const long *tokens, long B, CACHE_ELEM *k_cache, CACHE_ELEM *v_cache,          \
             long max_len, const int *slot, float *logits) {                                                       \
        const int refusal = step_refusal(m->C, m->H, 16, tokens, slot, B, m->vocab, m->n_positions, max_len);      \
        return refusal ? refusal : decode_step(m, tokens, B, k_cache, v_cache, max_len, slot, logits);             \
    }
