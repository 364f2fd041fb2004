/* The weight tables of the decode-step kernels (decode_blocks_f32.c in fp32, decode_step_bf16.c in bf16), laid out as
 * gpt2/decode_blocks.py's BlockWeights and gpt2/cpu_decode_step.py's ModelWeights: each weight row-major as in
 * nn.Linear ([out, in]) and nn.LayerNorm; and the check of a step's inputs that both make. */
#pragma once
#include <stdint.h>

/* One block's parameters; next_ln is the next block's ln_1, or ln_f after the last. */
#define BLOCK_WEIGHTS(T)                                                                                       \
    struct {                                                                                                   \
        const T *attn_w, *attn_b, *attn_proj_w, *attn_proj_b;                                                  \
        const T *ln_2_w, *ln_2_b;                                                                              \
        const T *fc_w, *fc_b, *mlp_proj_w, *mlp_proj_b;                                                        \
        const T *next_ln_w, *next_ln_b;                                                                        \
    }

/* The model's parameters for a whole step: wte (vocab, C); wpe (n_positions, C); ln_1 of the first block; the
 * lm_head (vocab, C), no bias (wte itself where tied); the blocks. */
#define MODEL_WEIGHTS(T, BLOCKS)                                                                               \
    struct {                                                                                                   \
        const T *wte, *wpe, *ln_1_w, *ln_1_b, *lm_head;                                                        \
        const BLOCKS *blocks;                                                                                  \
        long n_layer, vocab, n_positions, C, H;                                                                \
        float eps;                                                                                             \
    }

typedef BLOCK_WEIGHTS(float) block_weights;
typedef BLOCK_WEIGHTS(uint16_t) block_weights_bf16;
typedef MODEL_WEIGHTS(float, block_weights) model_weights;
typedef MODEL_WEIGHTS(uint16_t, block_weights_bf16) model_weights_bf16;

/* Every row's token inside [0, vocab) and slot inside [0, min(n_positions, max_len)). */
static inline int step_inputs_valid(const long *tokens, const int *slot, long B, long vocab, long n_positions,
                                    long max_len) {
    for (long b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= vocab || slot[b] < 0 || slot[b] >= n_positions || slot[b] >= max_len)
            return 0;
    return 1;
}
