/* decode_step_int8.c's step over a bf16 KV cache (gpt2.load(..., quantize="int8", kv_dtype=torch.bfloat16)): each new
 * key and value rounded to bf16 as it is written, every key and value widened to fp32 as attention reads it
 * (kv_bf16.h). -1 in a build without AVX-512 (see DECODE_STEP_ENTRY). */
#include "kv_bf16.h"
#include "decode_int8.h"

DECODE_STEP_ENTRY(decode_step_int8_kv_bf16, decode_step, model_weights_int8, float, uint16_t, 64)
