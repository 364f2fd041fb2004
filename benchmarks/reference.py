"""The reference this engine is checked and timed against: Hugging Face `transformers`' GPT-2 on the same seeded
random weights (no machine here reaches the hub), and its `generate` as a benchmark engine."""

from __future__ import annotations

import torch
import transformers

from gpt2 import GPT2, GPT2Config
from gpt2.bench import Engine
from gpt2.checkpoint import to_engine_state_dict
from gpt2.cpu.huge_pages import huge_page_weights


def make_reference_model(config: GPT2Config, seed: int = 0, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A seeded random transformers GPT2LMHeadModel with config's sizes (fp32, eval).

    Biases and LayerNorm parameters get small random values too, so no tensor is a trivial 0 or 1.
    """
    torch.manual_seed(seed)
    hf_model = transformers.GPT2LMHeadModel._from_config(transformers.GPT2Config(**config.to_dict()),
                                                        attn_implementation=attn_implementation, dtype=torch.float32)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02)
            elif ".ln_" in name:
                param.normal_(1.0, 0.1)
    return hf_model.eval()


def reference_pair(config: GPT2Config, seed: int = 0) -> tuple[torch.nn.Module, GPT2]:
    """`make_reference_model` and this engine's model holding the same weights (fp32, eval)."""
    hf_model = make_reference_model(config, seed)
    _, state_dict = to_engine_state_dict(hf_model.state_dict(), source="benchmark model", config=config)
    model = GPT2(config)
    model.load_state_dict(state_dict)
    huge_page_weights(model)  # as gpt2.load places them
    return hf_model, model.eval()


def transformers_engine(hf_model: torch.nn.Module, attn: str, name: str | None = None, **generate_kwargs) -> Engine:
    """Hugging Face `generate` on hf_model with attention implementation attn ("eager", "sdpa")."""

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        hf_model.set_attn_implementation(attn)
        ids = torch.tensor(prompts, device=hf_model.device)  # (B, T), equal lengths: no padding
        with torch.inference_mode():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, pad_token_id=hf_model.config.eos_token_id, **generate_kwargs)
        return out[:, ids.shape[1]:].tolist()

    return Engine(name or f"transformers {attn}", generate)
