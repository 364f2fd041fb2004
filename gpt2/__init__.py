"""A lean GPT-2 inference engine for DialoGPT: exact against the reference, with custom Triton kernels."""

from .config import PRESETS, ConfigError, GPT2Config
from .generation import generate
from .kv_cache import KVCache
from .model import GPT2
