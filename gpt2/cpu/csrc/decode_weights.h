/* The weight tables of the decode-step kernels (decode_blocks_f32.c and decode_step_f32.c in fp32, decode_step_bf16.c
 * in bf16, decode_step_int8.c with int8 linears, and decode_step_*_kv_*.c, the fp32 and int8 steps over a bf16 or
 * fp16 KV cache), laid out as gpt2/cpu/decode_blocks.py's BlockWeights and gpt2/cpu/decode_step.py's ModelWeights:
 * each weight row-major as in nn.Linear ([out, in]) and nn.LayerNorm; and the check of a step's inputs that they all
 * make, with the exported entry of the steps written for AVX-512. */
#pragma once
#include <stdint.h>

#include "attention_f32.h"
#include "int8.h"
#include "simd.h"
#include "small_batch_matmul.h"

/* One block's parameters: its linears' weights (TW) and biases (TB: for int8 linears, each row's scale, bias and
 * sum, int8.h's int8_row), its LayerNorms' (TN); next_ln is the next block's ln_1, or ln_f after the last. */
#define BLOCK_WEIGHTS(TW, TB, TN)                                                                              \
    struct {                                                                                                   \
        const TW *attn_w;                                                                                      \
        const TB *attn_b;                                                                                      \
        const TW *attn_proj_w;                                                                                 \
        const TB *attn_proj_b;                                                                                 \
        const TN *ln_2_w, *ln_2_b;                                                                             \
        const TW *fc_w;                                                                                        \
        const TB *fc_b;                                                                                        \
        const TW *mlp_proj_w;                                                                                  \
        const TB *mlp_proj_b;                                                                                  \
        const TN *next_ln_w, *next_ln_b;                                                                       \
    }

/* The model's parameters for a whole step: wte (vocab, C); wpe (n_positions, C); ln_1 of the first block; the
 * lm_head (vocab, C) (wte itself where tied) and its bias, NULL for none (an int8 lm_head's rows, int8_row); the
 * blocks. */
#define MODEL_WEIGHTS(T, TW, TB, BLOCKS)                                                                       \
    struct {                                                                                                   \
        const T *wte, *wpe, *ln_1_w, *ln_1_b;                                                                  \
        const TW *lm_head;                                                                                     \
        const TB *lm_head_b;                                                                                   \
        const BLOCKS *blocks;                                                                                  \
        long n_layer, vocab, n_positions, C, H;                                                                \
        float eps;                                                                                             \
    }

typedef BLOCK_WEIGHTS(float, float, float) block_weights;
typedef BLOCK_WEIGHTS(uint16_t, uint16_t, uint16_t) block_weights_bf16;
typedef BLOCK_WEIGHTS(int8_t, int8_row, float) block_weights_int8;
typedef MODEL_WEIGHTS(float, float, float, block_weights) model_weights;
typedef MODEL_WEIGHTS(uint16_t, uint16_t, uint16_t, block_weights_bf16) model_weights_bf16;
typedef MODEL_WEIGHTS(float, int8_t, int8_row, block_weights_int8) model_weights_int8;

/* Whether the decode kernels take B rows of n_embd C in H heads: not B outside 1..SMALL_BATCH_MAX_ROWS, C not a
 * multiple of c_multiple, or a head_dim (C / H) not a multiple of 16 or over ATTENTION_MAX_HEAD_DIM. */
static inline int step_shape_taken(long B, long C, long H, long c_multiple) {
    const long D = H ? C / H : 0;
    return B >= 1 && B <= SMALL_BATCH_MAX_ROWS && C % c_multiple == 0 && D % 16 == 0 && D * H == C
           && D <= ATTENTION_MAX_HEAD_DIM;
}

/* Whether a step kernel takes these inputs: 0; -1 for a shape step_shape_taken refuses; -3 for a row's token outside
 * [0, vocab) or its slot outside [0, min(n_positions, max_len)). */
static inline int step_refusal(long C, long H, long c_multiple, const long *tokens, const int *slot, long B, long vocab,
                               long n_positions, long max_len) {
    if (!step_shape_taken(B, C, H, c_multiple)) return -1;
    for (long b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= vocab || slot[b] < 0 || slot[b] >= n_positions || slot[b] >= max_len)
            return -3;
    return 0;
}

/* Defines NAME(m, tokens, B, k_cache, v_cache, max_len, slot, logits), the exported step of a kernel written for
 * AVX-512 (STEP: a static function of the same arguments, defined in AVX-512 builds only), of a model (MODEL) whose
 * logits are T, whose KV cache is CACHE_T and whose n_embd is a multiple of C_MULTIPLE: it returns step_refusal's
 * status for what STEP does not take (nothing done), else STEP's; -1 in a build without AVX-512 (nothing done). */
#define DECODE_STEP_ENTRY(NAME, STEP, MODEL, T, CACHE_T, C_MULTIPLE)                                           \
    int NAME(const MODEL *m, const long *tokens, long B, CACHE_T *k_cache, CACHE_T *v_cache, long max_len,     \
             const int *slot, T *logits) {                                                                     \
        const int refusal = step_refusal(m->C, m->H, C_MULTIPLE, tokens, slot, B, m->vocab, m->n_positions, max_len); \
        return refusal ? refusal : AVX512_ONLY(STEP(m, tokens, B, k_cache, v_cache, max_len, slot, logits));    \
    }
#if VLANES == 16
#define AVX512_ONLY(call) call
#else
#define AVX512_ONLY(call) ((void)k_cache, (void)v_cache, (void)logits, -1)
#endif
