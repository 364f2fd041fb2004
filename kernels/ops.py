"""Every launcher and its torch reference in one namespace: `from gpt2_kernels import ops`, then `ops.layer_norm(...)`."""

from .attention_decode import attention_decode, attention_decode_reference
from .attention_prefill import attention_prefill, attention_prefill_reference
from .attention_residual import attention_residual, attention_residual_reference
from .bias_gelu import bias_gelu, bias_gelu_reference
from .embedding import embedding, embedding_reference
from .interpreter import interpreter_problem
from .layer_norm import add_layer_norm, add_layer_norm_reference, layer_norm, layer_norm_reference
from .linear_residual import linear_residual, linear_residual_reference
from .ln_linear import ln_linear, ln_linear_reference
from .qkv_append import ln_qkv_append, ln_qkv_append_reference

__all__ = [
    "add_layer_norm",
    "add_layer_norm_reference",
    "attention_decode",
    "attention_decode_reference",
    "attention_prefill",
    "attention_prefill_reference",
    "attention_residual",
    "attention_residual_reference",
    "bias_gelu",
    "bias_gelu_reference",
    "embedding",
    "embedding_reference",
    "interpreter_problem",
    "layer_norm",
    "layer_norm_reference",
    "linear_residual",
    "linear_residual_reference",
    "ln_linear",
    "ln_linear_reference",
    "ln_qkv_append",
    "ln_qkv_append_reference",
]
