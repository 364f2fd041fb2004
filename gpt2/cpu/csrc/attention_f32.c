/* Causal attention of a chunk of queries over the KV cache, fp32 (see attention_f32.h): attention.h's kernel on fp32.
 * A prefill chunk's attention is small (DialoGPT-small, 8 rows of 32 tokens: 12 heads of 32 x 32 scores per row), and
 * torch's SDPA spends most of its time outside the arithmetic there.
 */
#include "attention_f32.h"
#include "elem_f32.h"
#include "attention.h"

int attention_f32(const float *q, attention_strides q_strides, const float *k, const float *v,
                  attention_strides kv_strides, const int *q_start, const int *kv_len, float *out,
                  attention_strides out_strides, long B, long H, long T, long S, long D) {
    return attention(q, q_strides, k, v, kv_strides, q_start, kv_len, out, out_strides, B, H, T, S, D);
}
