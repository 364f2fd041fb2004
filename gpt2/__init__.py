"""A lean GPT-2 inference engine for DialoGPT: exact against the reference, with custom Triton kernels."""

from .chat import Chat, ChatNotice
from .config import PRESETS, ConfigError, GPT2Config
from .convert import convert
from .generation import generate
from .kv_cache import KVCache
from .loading import load
from .mmi import MMIReranker
from .model import GPT2
from .tokenizer import Tokenizer
