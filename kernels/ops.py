"""Every launcher and its torch reference in one namespace: `from gpt2_kernels import ops`, then `ops.layer_norm(...)`."""

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
