/* The weight tables of the decode-step kernels (decode_blocks_f32.c in fp32, decode_step_bf16.c in bf16,
 * decode_step_int8.c with int8 linears), laid out as gpt2/decode_blocks.py's BlockWeights and gpt2/cpu_decode_step.py's
 * ModelWeights: each weight row-major as in nn.Linear ([out, in]) and nn.LayerNorm; and the check of a step's inputs
 * that they all make. */
#pragma once
#include <stdint.h>

#include "int8.h"

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

/* Every row's token inside [0, vocab) and slot inside [0, min(n_positions, max_len)). */
static inline int step_inputs_valid(const long *tokens, const int *slot, long B, long vocab, long n_positions,
                                    long max_len) {
    for (long b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= vocab || slot[b] < 0 || slot[b] >= n_positions || slot[b] >= max_len)
            return 0;
    return 1;
}
