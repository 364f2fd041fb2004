/* decode_step_f32.c's step over an fp16 KV cache (gpt2.load(..., kv_dtype=torch.float16) of an fp32 model): each new
 * key and value rounded to fp16 as it is written, every key and value widened to fp32 as attention reads it
 * (kv_f16.h); the rest as the fp32 step. */
#include "kv_f16.h"
#include "decode_f32.h"

DECODE_STEP_F32_ENTRY(decode_step_f32_kv_f16)
