"""Test helpers: a seeded reference model (transformers' GPT-2) and checkpoints in every format users meet.

Import as `from tests.checkpoints import make_reference_model, engine_twin, save_checkpoint, ...`.

make_reference_model uses attn_implementation="eager": the reference's plain softmax(q·kᵀ/√d)·v
path, the computation DialoGPT was trained with, and deterministic on CPU. Biases and LayerNorm
parameters, which transformers initialises to 0 and 1, are filled with small random values so that
a swapped or dropped tensor changes the logits.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from benchmarks import reference
from gpt2.checkpoint import to_engine_state_dict
from gpt2.config import GPT2Config
from gpt2.model import GPT2
from gpt2.tokenizer import VOCAB_DIR, Tokenizer

FORMATS = ("hf-safetensors", "hf-bin-fp16", "pkl", "pkl-module", "pkl-transformer-only", "safetensors-file")
FP16_FORMATS = ("hf-bin-fp16", "pkl", "pkl-module", "pkl-transformer-only")


def make_reference_model(config: GPT2Config | str, seed: int = 0) -> transformers.GPT2LMHeadModel:
    """A randomly initialised (seeded) fp32 GPT2LMHeadModel in eval mode with config's sizes, eager attention."""
    if isinstance(config, str):
        config = GPT2Config.from_preset(config)
    return reference.make_reference_model(config, seed, attn_implementation="eager")


def engine_twin(reference: transformers.GPT2LMHeadModel, backend: str | None = None) -> GPT2:
    """This engine's model holding reference's weights (converted by gpt2.checkpoint), fp32, eval mode."""
    config = GPT2Config.from_dict(reference.config.to_dict())
    _, state_dict = to_engine_state_dict(reference.state_dict(), source="reference model", config=config)
    model = GPT2(config, backend=backend)
    model.load_state_dict(state_dict)
    model.tokenizer = Tokenizer.default()
    return model.eval()


def with_weights_rounded(model: transformers.GPT2LMHeadModel,
                         dtype: torch.dtype = torch.float16) -> transformers.GPT2LMHeadModel:
    """A copy of model whose weights went through dtype and back to fp32: the reference for fp16 checkpoints."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.to(dtype).float())
    return rounded


def _hf_state_dict(model: transformers.GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    """transformer.* tensors only (the tied lm_head left out), detached and contiguous."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("transformer.")}


def _mask_buffers(config: transformers.GPT2Config, dtype: torch.dtype, masked_bias: bool) -> dict[str, torch.Tensor]:
    """The causal-mask buffers old checkpoints carry: attn.bias (tril ones) and optionally attn.masked_bias (-1e4)."""
    n = config.n_positions
    buffers = {}
    for i in range(config.n_layer):
        buffers[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=dtype)).view(1, 1, n, n)
        if masked_bias:
            buffers[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return buffers


def _copy_vocab(out: Path) -> None:
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(VOCAB_DIR / name, out / name)


def save_checkpoint(hf_model: transformers.GPT2LMHeadModel, out: Path, fmt: str) -> Path:
    """Write hf_model in format fmt under the new directory out; returns the path to give to the reader.

    hf-safetensors: save_pretrained directory (config.json, model.safetensors) plus vocab.json, merges.txt.
    hf-bin-fp16: directory with an fp16 pytorch_model.bin as on the hub: uint8 attn.bias and
        attn.masked_bias buffers and a separate lm_head.weight.
    pkl / pkl-module / pkl-transformer-only: Microsoft's original release: a legacy (non-zip) fp16
        torch.save pickle with fp16 attn.bias buffers; `lm_head.decoder.weight`; with a `module.` prefix;
        or only the transformer part (no prefix, no lm_head).
    safetensors-file: one fp32 .safetensors file with the `transformer.` keys.
    """
    out = Path(out)
    out.mkdir(parents=True)
    sd = _hf_state_dict(hf_model)
    cfg = hf_model.config
    if fmt == "hf-safetensors":
        hf_model.save_pretrained(out)
        _copy_vocab(out)
        return out
    if fmt == "hf-bin-fp16":
        sd = {k: v.half() for k, v in sd.items()}
        sd.update(_mask_buffers(cfg, torch.uint8, masked_bias=True))
        sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
        torch.save(sd, out / "pytorch_model.bin")
        cfg.to_json_file(out / "config.json")
        _copy_vocab(out)
        return out
    if fmt in ("pkl", "pkl-module", "pkl-transformer-only"):
        sd = {k: v.half() for k, v in sd.items()}
        sd.update(_mask_buffers(cfg, torch.float16, masked_bias=False))
        if fmt == "pkl-transformer-only":
            sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        else:
            sd["lm_head.decoder.weight"] = sd["transformer.wte.weight"].clone()
        if fmt == "pkl-module":
            sd = {f"module.{k}": v for k, v in sd.items()}
        path = out / f"{fmt.replace('-', '_')}.pkl"
        torch.save(sd, path, _use_new_zipfile_serialization=False)
        return path
    if fmt == "safetensors-file":
        path = out / "weights.safetensors"
        save_file(sd, path, metadata={"format": "pt"})
        return path
    raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
