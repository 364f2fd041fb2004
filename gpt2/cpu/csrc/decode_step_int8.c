/* A whole decode step of an int8 model in one call, token ids to logits: 1 to 16 rows of one new token each (see
 * gpt2/cpu_decode_step.py; decode_blocks_f32.c is the same step in fp32), on CPUs with avx512_vnni.
 *
 * The block linears and the lm_head are int8 (gpt2/quantize.py's Int8Linear), their matmuls
 * small_batch_matmul_int8's (each input row quantized on its own); everything else is the fp32 step's: the
 * embeddings, the residual stream, LayerNorm, attention over the fp32 KV cache (decode_ops_f32.h).
 */
#include <stdlib.h>

#include "decode_ops_f32.h"
#include "decode_weights.h"
#include "int8.h"
#include "small_batch_matmul.h"

#if VLANES == 16 /* an AVX-512 build (simd.h); elsewhere the function below refuses every call */
static int decode_step(const model_weights_int8 *m, const long *tokens, long B, float *k_cache, float *v_cache,
                       long max_len, const int *slot, float *logits) {
    const long C = m->C, H = m->H, D = C / H;
    /* h, n (B, C); qkv (B, 3C); attention, projection (B, C); fc (B, 4C) */
    float *h = malloc(sizeof(float) * B * 11 * C);
    if (!h) return -2;
    float *n = h + B * C, *qkv = n + B * C, *attn = qkv + B * 3 * C, *proj = attn + B * C, *fc = proj + B * C;
    int kv_len[SMALL_BATCH_MAX_ROWS];
    embed_f32(m->wte, m->wpe, m->ln_1_w, m->ln_1_b, tokens, slot, B, C, m->eps, h, n, kv_len);
    int status = 0;
    for (long layer = 0; layer < m->n_layer && !status; layer++) {
        const block_weights_int8 *w = m->blocks + layer;
        const long cache_offset = layer * B * H * max_len * D;
        status = small_batch_matmul_int8(w->attn_w, w->attn_b, n, qkv, B, 3 * C, C, 0);
        if (!status) status = cached_attention_f32(qkv, k_cache + cache_offset, v_cache + cache_offset, slot, kv_len,
                                                   attn, B, H, D, max_len);
        if (!status) status = small_batch_matmul_int8(w->attn_proj_w, w->attn_proj_b, attn, proj, B, C, C, 0);
        if (status) break; /* out of memory: the caller raises */
        add_layer_norm_f32(h, proj, w->ln_2_w, w->ln_2_b, n, B, C, m->eps);
        status = small_batch_matmul_int8(w->fc_w, w->fc_b, n, fc, B, 4 * C, C, 1);
        if (!status) status = small_batch_matmul_int8(w->mlp_proj_w, w->mlp_proj_b, fc, proj, B, C, 4 * C, 0);
        if (!status) add_layer_norm_f32(h, proj, w->next_ln_w, w->next_ln_b, n, B, C, m->eps);
    }
    if (!status) status = small_batch_matmul_int8(m->lm_head, m->lm_head_b, n, logits, B, m->vocab, C, 0);
    free(h);
    return status;
}
#endif

/* One decode step of B rows of an int8 model, token ids to logits (B, vocab), as decode_step_f32, its n_embd a multiple
 * of 64; -1 in a build without AVX-512 (see DECODE_STEP_ENTRY). */
DECODE_STEP_ENTRY(decode_step_int8, decode_step, model_weights_int8, float, 64)
