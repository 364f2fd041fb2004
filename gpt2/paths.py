"""Where the engine keeps what it makes: converted hub checkpoints and the built C kernels."""

from __future__ import annotations

import os
from pathlib import Path


def engine_cache_dir() -> Path:
    """$GPT2_ENGINE_CACHE, else ~/.cache/dialogpt-engine."""
    return Path(os.environ.get("GPT2_ENGINE_CACHE") or Path.home() / ".cache" / "dialogpt-engine")
