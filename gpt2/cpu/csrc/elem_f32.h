/* fp32 as the element type of attention.h and decode_loop.h, for attention_f32.c and the fp32 and int8 decode steps:
 * their q, k, v, KV cache, embeddings, LayerNorm parameters and matmul inputs and outputs are fp32, read and written
 * as they are. */
#pragma once
#include "simd.h"

#define ELEM float
#define ELEM_TARGET
#define load_elem(p) vload(p)
#define store_elem(p, v) vstore(p, v)
/* attention.h's fp32 rounding: the scores are scaled after their dot products, and the values are summed in two sets
 * of accumulators (even and odd keys), twice the chains of dependent FMAs in flight. */
#define ATTENTION_SCALES_QUERY 0
#define ATTENTION_VALUE_CHAINS 2
