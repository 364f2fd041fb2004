/* decode_step_f32.c's step over a bf16 KV cache (gpt2.load(..., kv_dtype=torch.bfloat16) of an fp32 model): each new
 * key and value rounded to bf16 as it is written, every key and value widened to fp32 as attention reads it
 * (kv_bf16.h); the rest as the fp32 step. At long context a step reads the cache besides the weights, and this reads
 * half the bytes of an fp32 one. */
#include "kv_bf16.h"
#include "decode_f32.h"

DECODE_STEP_F32_ENTRY(decode_step_f32_kv_bf16)
