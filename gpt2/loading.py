"""`load`: a ready-to-run GPT2 from an engine directory, a Hugging Face directory, a weights file or a hub id.

A hub id (`owner/name`, not an existing path) is fetched with huggingface_hub into its cache (honouring
HF_HUB_OFFLINE), converted once into the engine cache ($GPT2_ENGINE_CACHE, default
~/.cache/dialogpt-engine/<owner>--<name>/<revision>) and loaded from there afterwards.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, is_engine_dir, read_checkpoint
from .convert import DestinationExistsError, convert
from .cpu.bf16_linear import pack_bf16, why_not_packable
from .cpu.huge_pages import huge_page_weights
from .cpu.int8_linear import quantize_int8
from .model import GPT2
from .paths import engine_cache_dir
from .tokenizer import tokenizer_for

HUB_FILES = ["config.json", "vocab.json", "merges.txt"]  # fetched with the weights
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_LOAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUANTIZATIONS = (None, "int8")


class ModelNotFoundError(CheckpointError):
    """Neither a local path nor a hub id that could be fetched."""


def load(path_or_hub_id: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         backend: str | None = None, quantize: str | None = None) -> GPT2:
    """The model (eval mode, on device, in dtype) with its tokenizer set as `model.tokenizer`.

    quantize="int8": int8 linear layers on the CPU (`gpt2.cpu.int8_linear`), for an fp32 model.
    dtype=torch.bfloat16 on a CPU with native bf16 (avx512_bf16, AMX) packs the linear weights for oneDNN
    (`gpt2.cpu.bf16_linear`): about 2x faster than fp32 per decode step and per prefill.
    """
    if dtype not in _LOAD_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; choose torch.float16, torch.bfloat16 or torch.float32")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not supported; choose one of {QUANTIZATIONS}")
    device = _check_device(device)
    path = Path(path_or_hub_id)
    if not path.exists():
        if not (isinstance(path_or_hub_id, str) and _HUB_ID.fullmatch(path_or_hub_id)):
            raise ModelNotFoundError(f"{path_or_hub_id}: no such file or directory (and not a hub id of the form "
                                     "owner/name). Give a converted directory (`gpt2 convert SRC DST`), a Hugging "
                                     "Face checkpoint directory or weights file, or a hub id")
        path = _engine_dir_for_hub_id(path_or_hub_id)
    config, state_dict = read_checkpoint(path)
    with torch.device("meta"):  # no random init: every parameter is assigned from the checkpoint below
        model = GPT2(config)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}, assign=True)
    huge_page_weights(model)  # CPU only: 3-6 % faster decode steps (measured in gpt2/huge_pages.py)
    model.set_backend(backend)  # a backend that cannot run on this device fails here, not mid-generation
    if quantize == "int8":
        quantize_int8(model)
    elif why_not_packable(model) is None:  # bf16 on a CPU with native bf16, torch backend
        pack_bf16(model)
    model.tokenizer = tokenizer_for(path)
    return model.eval()


def _check_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available on this machine")
    return device


def _engine_dir_for_hub_id(repo_id: str) -> Path:
    snapshot = _download(repo_id)
    target = engine_cache_dir() / repo_id.replace("/", "--") / snapshot.name
    if not is_engine_dir(target):
        try:
            convert(snapshot, target)
        except DestinationExistsError:  # another process converted it meanwhile
            if not is_engine_dir(target):
                raise
    return target


def _download(repo_id: str) -> Path:
    """The hub snapshot directory holding repo_id's config, tokenizer files and weights (safetensors preferred)."""
    from huggingface_hub import constants, snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=[*HUB_FILES, "model.safetensors"]))
        if not (snapshot / "model.safetensors").is_file():
            snapshot = Path(snapshot_download(repo_id, allow_patterns=[*HUB_FILES, "pytorch_model.bin"]))
    except Exception as e:  # huggingface_hub reports network, offline and not-found cases as many types
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        download = ("no download (HF_HUB_OFFLINE=1)" if constants.is_offline_mode()
                    else "a download from the Hugging Face hub")
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local path, and fetching it from the Hugging Face hub failed. Tried: the hub "
            f"cache {constants.HF_HUB_CACHE}, then {download} ({reason}). To use a checkpoint you have as files, "
            "convert it: `gpt2 convert SRC DST && gpt2 chat DST` on the command line, or `gpt2 convert SRC DST` "
            "then `gpt2.load(DST)` in Python."
        ) from None
    if not any((snapshot / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise ModelNotFoundError(f"{repo_id!r}: the hub snapshot {snapshot} has neither model.safetensors nor "
                                 "pytorch_model.bin; convert a local checkpoint with `gpt2 convert SRC DST` instead")
    return snapshot
