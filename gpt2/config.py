"""GPT-2 hyper-parameters: named presets, reading a Hugging Face `config.json`, refusing what we don't run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration this engine cannot run, or a config file it cannot read."""


@dataclass(frozen=True)
class GPT2Config:
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_positions: int = 1024
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self) -> None:
        for name in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(
                f"activation_function {self.activation_function!r} is not supported: "
                "this engine runs GPT-2's tanh GELU ('gelu_new')"
            )
        if self.scale_attn_by_inverse_layer_idx:
            raise ConfigError("scale_attn_by_inverse_layer_idx=True is not supported (GPT-2 and DialoGPT leave it off)")
        if not self.scale_attn_weights:
            raise ConfigError("scale_attn_weights=False is not supported (GPT-2 and DialoGPT scale by 1/sqrt(head_dim))")
        if not 0 < self.layer_norm_epsilon < 1:
            raise ConfigError(f"layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str) -> GPT2Config:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> GPT2Config:
        """Build from a Hugging Face GPT-2 config dict (aliases n_ctx / n_positions); unknown keys are ignored."""
        if raw.get("model_type", "gpt2") != "gpt2":
            raise ConfigError(f"{source}: model_type {raw['model_type']!r} is not 'gpt2'")
        if raw.get("n_inner") not in (None, 4 * raw.get("n_embd", 768)):
            raise ConfigError(f"{source}: n_inner={raw['n_inner']} is not supported (GPT-2 uses 4 * n_embd)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in fields}
        if "n_positions" not in kwargs and "n_ctx" in raw:
            kwargs["n_positions"] = raw["n_ctx"]
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> GPT2Config:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face-compatible GPT-2 config dict."""
        d = dataclasses.asdict(self)
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions, n_inner=None)
        return d


def _preset(n_embd: int, n_layer: int, n_head: int) -> GPT2Config:
    return GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head)


PRESETS: dict[str, GPT2Config] = {
    "dialogpt-small": _preset(768, 12, 12),
    "dialogpt-medium": _preset(1024, 24, 16),
    "dialogpt-large": _preset(1280, 36, 20),
    "gpt2": _preset(768, 12, 12),
    "gpt2-medium": _preset(1024, 24, 16),
    "gpt2-large": _preset(1280, 36, 20),
    "gpt2-xl": _preset(1600, 48, 25),
}
