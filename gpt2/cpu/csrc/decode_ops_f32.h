/* The fp32 parts of a CPU decode step between its matmuls, defined in decode_blocks_f32.c: used there and by
 * decode_step_int8.c, whose steps keep the residual stream, LayerNorm, attention and the KV cache in fp32. */
#pragma once
#include "attention_f32.h"

/* h += x, then n = LayerNorm(h) * w + b, for B rows of C floats (C a multiple of 16). */
void add_layer_norm_f32(float *h, const float *x, const float *w, const float *b, float *n, long B, long C, float eps);

/* Writes row b's new key and value (qkv's k and v parts) at slot[b] when the row adds a token (kv_len > slot),
 * then out[b, h] = attention of the row's query over keys [0, min(slot + 1, kv_len)) for each head h.
 * qkv (B, 3, H, D); k, v (B, H, max_len, D) this layer's cache; out (B, H, D). Returns 0, or -2 when out of memory. */
int cached_attention_f32(const float *qkv, float *k, float *v, const int *slot, const int *kv_len, float *out, long B,
                         long H, long D, long max_len);

/* A step's start: h (B, C) = wte[tokens[b]] + wpe[slot[b]], n = LayerNorm(h) with ln_w, ln_b, and kv_len[b] =
 * slot[b] + 1 (each row adds its token at slot[b]). */
void embed_f32(const float *wte, const float *wpe, const float *ln_w, const float *ln_b, const long *tokens,
               const int *slot, long B, long C, float eps, float *h, float *n, int *kv_len);
