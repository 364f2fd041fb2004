/* Causal attention of a chunk of queries over a row's keys and values in fp32, on the CPU: called by
 * gpt2/cpu/attention.py, defined in attention_f32.c (attention.h's kernel, which the decode steps run too).
 *
 * Query t of row b sits at position q_start[b] + t and attends keys [0, min(q_start[b] + t + 1, kv_len[b])): key
 * slot == position, as in the KV cache (gpt2/kv_cache.py). A query with no key gets zeros. q (B, H, T, D), k and v
 * (B, H, S, D) with every kv_len <= S (slots past kv_len are read, never used: any values do), and out (B, H, T, D)
 * are given by their element strides (the last dimension contiguous), so q may be a view of the qkv matmul's output,
 * k and v views of the cache, and out any layout. D a multiple of 16, at most ATTENTION_MAX_HEAD_DIM. Returns 0; -1
 * for a D it does not take (nothing written); -2 when out of memory. */
#pragma once

#define ATTENTION_MAX_HEAD_DIM 256 /* a query's output is kept in vector registers: 16 of AVX-512's, 32 of AVX2's */

typedef struct {
    long b, h, t; /* element strides of the batch, head and token dimensions */
} attention_strides;

int attention_f32(const float *q, attention_strides q_strides, const float *k, const float *v,
                  attention_strides kv_strides, const int *q_start, const int *kv_len, float *out,
                  attention_strides out_strides, long B, long H, long T, long S, long D);
