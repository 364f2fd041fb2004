"""Triton kernels for the GPT-2 inference engine, each beside its plain-torch reference.

Launchers accept fp32, fp16 and bf16 tensors (fp32 accumulation, output in the input dtype) and
compute grid sizes from tensor shapes only (no host syncs). On CPU tensors they run only under the
Triton interpreter (TRITON_INTERPRET=1 set before triton is imported). This package never imports
the model package.
"""

from .attention_decode import attention_decode, attention_decode_reference
from .attention_prefill import attention_prefill, attention_prefill_reference
from .bias_gelu import bias_gelu, bias_gelu_reference
from .interpreter import interpreter_problem
from .layer_norm import add_layer_norm, add_layer_norm_reference, layer_norm, layer_norm_reference

__all__ = [
    "add_layer_norm",
    "add_layer_norm_reference",
    "attention_decode",
    "attention_decode_reference",
    "attention_prefill",
    "attention_prefill_reference",
    "bias_gelu",
    "bias_gelu_reference",
    "interpreter_problem",
    "layer_norm",
    "layer_norm_reference",
]
