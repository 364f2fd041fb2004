"""Converting a released checkpoint into a self-contained engine directory, written atomically.

The directory holds config.json (Hugging Face GPT-2 fields plus "engine_format"), model.safetensors in
the engine layout (metadata format = ENGINE_FORMAT), vocab.json and merges.txt. It is assembled in a
temporary directory beside DST and renamed into place; an existing DST is replaced only with force,
only if it is itself a converted model (or empty), and only once the new one is complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import ENGINE_FORMAT, is_engine_dir, read_checkpoint
from .config import GPT2Config
from .tokenizer import Tokenizer, tokenizer_for

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class ConvertError(ValueError):
    """A destination or option that convert refuses."""


class DestinationExistsError(ConvertError):
    """DST already exists and force was not given."""


def convert(src: str | Path, dst: str | Path, *, preset: str | None = None, config: str | Path | GPT2Config | None = None,
            dtype: torch.dtype | None = None, force: bool = False, progress: bool = True) -> Path:
    """Write the checkpoint at src as an engine directory dst; returns dst.

    The source dtype is kept unless dtype is given (float16, bfloat16 or float32).
    """
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in DTYPES.values():
        raise ConvertError(f"dtype {dtype} is not supported; choose one of torch.float16, torch.bfloat16, torch.float32")
    _check_destination(src, dst, force)
    config, state_dict = read_checkpoint(src, preset=preset, config=config, progress=progress)
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    tokenizer = tokenizer_for(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        _write(tmp, config, state_dict, tokenizer)
        _put_in_place(tmp, dst, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_dst.is_relative_to(real_src):
        raise ConvertError(f"destination {dst} is the source {src} or inside it; choose a new directory")
    if not (dst.exists() or dst.is_symlink()):
        return
    if not force:
        raise DestinationExistsError(f"destination {dst} already exists; pass --force (force=True) to replace it")
    if real_src.is_relative_to(real_dst):
        raise ConvertError(f"destination {dst} contains the source {src}; replacing it would delete the source")
    if not (is_engine_dir(dst) or (dst.is_dir() and not any(dst.iterdir()))):
        raise ConvertError(f"destination {dst} exists and is not a model directory written by `gpt2 convert`; "
                           "not replacing it even with --force (choose another path or remove it yourself)")


def _write(directory: Path, config: GPT2Config, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer) -> None:
    config_json = {**config.to_dict(), "engine_format": ENGINE_FORMAT}
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    save_file(state_dict, directory / "model.safetensors", metadata={"format": ENGINE_FORMAT})
    # safetensors creates the file private (0600); give it the mode of an ordinary new file, as config.json has.
    os.chmod(directory / "model.safetensors", stat.S_IMODE((directory / "config.json").stat().st_mode))
    tokenizer.save(directory)


def _put_in_place(tmp: Path, dst: Path, force: bool) -> None:
    """Rename the finished tmp to dst; an existing dst (force) is moved aside first and removed last."""
    old = None
    if force and (dst.exists() or dst.is_symlink()):
        old = dst.with_name(f"{tmp.name.removesuffix('.partial')}.old")
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except OSError as e:
        if old is not None:
            os.rename(old, dst)
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise DestinationExistsError(f"destination {dst} appeared while converting; not replacing it") from None
        raise
    if old is not None:
        if old.is_symlink() or not old.is_dir():
            old.unlink()
        else:
            shutil.rmtree(old)
