"""Converting a released checkpoint into a self-contained engine directory, written atomically.

The directory holds config.json (Hugging Face GPT-2 fields plus "engine_format"), model.safetensors in
the engine layout (metadata format = ENGINE_FORMAT), vocab.json and merges.txt. It is assembled in a
temporary directory beside DST and renamed into place; an existing DST is replaced only with force,
only if it is itself a converted model (or empty), and only once the new one is complete.

Conversions into one parent directory take turns (an exclusive flock on the parent), so each finds any
`.DST.<hex>.partial` / `.DST.<hex>.old` there left by a conversion that was killed: it removes them, and
puts back a previous model that a killed --force conversion had moved aside. A cast to a narrower dtype
that would turn weights into inf is refused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import ENGINE_FORMAT, holds_non_finite, is_engine_dir, is_symlink_loop, read_checkpoint
from .config import GPT2Config
from .tokenizer import Tokenizer, tokenizer_for

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class ConvertError(ValueError):
    """A destination or option that convert refuses."""


class DestinationExistsError(ConvertError):
    """DST already exists and force was not given."""


class DtypeOverflowError(ConvertError):
    """A weight too large for the requested dtype: casting would store inf."""


class InterruptedConversionWarning(UserWarning):
    """Leftovers of a killed conversion were removed, or the model it had moved aside was put back."""


def convert(src: str | Path, dst: str | Path, *, preset: str | None = None, config: str | Path | GPT2Config | None = None,
            dtype: torch.dtype | None = None, force: bool = False, progress: bool = True) -> Path:
    """Write the checkpoint at src as an engine directory dst; returns dst.

    The source dtype is kept unless dtype is given (float16, bfloat16 or float32).
    """
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in DTYPES.values():
        raise ConvertError(f"dtype {dtype} is not supported; choose one of torch.float16, torch.bfloat16, torch.float32")
    _check_destination(src, dst, force)  # refuse before reading the checkpoint; checked again under the lock
    config, state_dict = read_checkpoint(src, preset=preset, config=config, progress=progress)
    if dtype is not None:
        _cast(state_dict, dtype, src)
    tokenizer = tokenizer_for(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _conversions_into(dst.parent):
        _clean_up_killed_conversions(dst)
        _check_destination(src, dst, force)  # another process may have written dst meanwhile
        tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.partial"
        tmp.mkdir()
        try:
            write_engine_dir(tmp, config, state_dict, tokenizer)
            _put_in_place(tmp, dst, force)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype, src: Path) -> None:
    """Cast every tensor to dtype in place (one tensor at a time, so the model is never held twice).

    Refuses a finite weight that would become inf; values already NaN or inf were warned about when read.
    """
    for name, value in state_dict.items():
        cast = value.to(dtype)
        if holds_non_finite(cast):  # rare: look closer
            finite = torch.isfinite(value)
            if torch.isinf(cast[finite]).any():
                raise DtypeOverflowError(
                    f"{src}: tensor {name!r} holds values up to {value[finite].abs().max().item():.6g} in magnitude, "
                    f"beyond {dtype}'s largest {torch.finfo(dtype).max:.6g}: they would be stored as inf. Choose a "
                    "dtype with a wider range (bf16 or fp32) or keep the source's; nothing was written"
                )
        state_dict[name] = cast


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    for role, path in (("source", src), ("destination", dst)):
        if is_symlink_loop(path):
            raise ConvertError(f"{role} {path} is a symlink loop (following its links never reaches a file or "
                               "directory); give a path that does")
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_dst.is_relative_to(real_src):
        raise ConvertError(f"destination {dst} is the source {src} or inside it; choose a new directory")
    if not _exists(dst):
        return
    if not force:
        raise DestinationExistsError(f"destination {dst} already exists; pass --force (force=True) to replace it")
    if real_src.is_relative_to(real_dst):
        raise ConvertError(f"destination {dst} contains the source {src}; replacing it would delete the source")
    if not (is_engine_dir(dst) or (dst.is_dir() and not any(dst.iterdir()))):
        raise ConvertError(f"destination {dst} exists and is not a model directory written by `gpt2 convert`; "
                           "not replacing it even with --force (choose another path or remove it yourself)")


def write_engine_dir(directory: Path, config: GPT2Config, state_dict: dict[str, torch.Tensor],
                     tokenizer: Tokenizer) -> None:
    """Write config.json, model.safetensors (state_dict in the engine layout, contiguous tensors), vocab.json and
    merges.txt into the existing directory: what `convert` assembles before moving it into place."""
    config_json = {**config.to_dict(), "engine_format": ENGINE_FORMAT}
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    save_file(state_dict, directory / "model.safetensors", metadata={"format": ENGINE_FORMAT})
    # safetensors creates the file private (0600); give it the mode of an ordinary new file, as config.json has.
    os.chmod(directory / "model.safetensors", stat.S_IMODE((directory / "config.json").stat().st_mode))
    tokenizer.save(directory)


@contextmanager
def _conversions_into(parent: Path) -> Iterator[None]:
    """Hold an exclusive flock on the directory parent: conversions into it run one at a time.

    The kernel drops the lock when its holder dies, even by SIGKILL; so whoever holds it knows that any
    `.DST.<hex>.partial` or `.old` in parent belongs to no running conversion.
    """
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _clean_up_killed_conversions(dst: Path) -> None:
    """Remove what killed conversions into dst left beside it; a moved-aside model whose dst is missing goes back.

    Only called under _conversions_into(dst.parent). A `.old` with dst missing is the previous model, moved
    aside by a --force conversion killed before it renamed the new one in: it is restored, never removed.
    """
    leftover = re.compile(rf"\.{re.escape(dst.name)}\.[0-9a-f]{{8}}\.(partial|old)")
    found = [path for path in dst.parent.iterdir() if leftover.fullmatch(path.name)]
    # Newest first: with several (from runs before this cleanup existed), the last model moved aside is restored.
    olds = sorted((p for p in found if p.name.endswith(".old")), key=lambda p: p.lstat().st_ctime, reverse=True)
    for old in olds:
        if not _exists(dst):
            os.rename(old, dst)
            warnings.warn(f"restored {dst} from {old.name}: a `gpt2 convert --force` into it was killed after moving "
                          "the previous model aside, before putting the new one in place", InterruptedConversionWarning,
                          stacklevel=3)
            found.remove(old)
    for path in found:
        _remove(path)
    if found:
        names = ", ".join(sorted(path.name for path in found))
        warnings.warn(f"removed leftovers of killed conversions into {dst} from {dst.parent}: {names}",
                      InterruptedConversionWarning, stacklevel=3)


def _put_in_place(tmp: Path, dst: Path, force: bool) -> None:
    """Rename the finished tmp to dst; an existing dst (force) is moved aside first and removed last."""
    old = None
    if force and _exists(dst):
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
        _remove(old)


def _exists(path: Path) -> bool:
    """Whether anything is at path, a dangling symlink included."""
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    """Delete path: a file or symlink (not its target), or a directory tree."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)
