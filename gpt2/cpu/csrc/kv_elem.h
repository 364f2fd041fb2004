/* The KV cache's element type in attention.h and decode_loop.h: CACHE_ELEM, load_cache(p) (VLANES of them at p,
 * widened to an fp32 vector) and write_cache(dst, src, n) (n of the step's ELEM at src, rounded into the cache at dst).
 * The step's own ELEM, copied as it is, unless its includer took kv_bf16.h or kv_f16.h first: a bf16 or fp16 cache
 * under an fp32 step (gpt2.load(..., kv_dtype=...)).
 */
#pragma once
#include <string.h>

#ifndef CACHE_ELEM
#define CACHE_ELEM ELEM
#define load_cache(p) load_elem(p)
#define write_cache(dst, src, n) memcpy(dst, src, sizeof(ELEM) * (n))
#endif
