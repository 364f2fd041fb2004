/* Every transformer block of a CPU decode step in one call, fp32: 1 to 16 rows of one new token each, decode_loop.h's
 * layer loop over the caller's residual stream and KV cache (see gpt2/cpu/decode_blocks.py for why). */
#include "decode_f32.h"

/* h, n (B, C): the residual stream and ln_1 of it for the first block; on return, after every block, and ln_f of
 * it. k_cache, v_cache (n_layer, B, H, max_len, D). slot, kv_len (B,): each row's new token goes to slot[b] where
 * kv_len[b] > slot[b], and its query attends keys [0, min(slot[b] + 1, kv_len[b])). Returns 0; -1 for a shape
 * step_shape_taken refuses (nothing done); -2 when out of memory. */
int decode_blocks_f32(const block_weights *blocks, long n_layer, float *h, float *n, long B, long C, long H,
                      float *k_cache, float *v_cache, long max_len, const int *slot, const int *kv_len, float eps) {
    if (!step_shape_taken(B, C, H, 16)) return -1;
    return decode_layers(blocks, n_layer, h, n, B, C, H, k_cache, v_cache, max_len, slot, kv_len, eps);
}
