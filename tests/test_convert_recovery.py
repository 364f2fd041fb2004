"""Conversions killed part-way (SIGKILL): the next one into the same place cleans up and never loses a model.

Each kill is real: a subprocess runs `convert` with a hook that SIGKILLs the process at a chosen point
(KILLED_CONVERT below). Running conversions are never disturbed: they hold the parent directory's lock.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from gpt2.checkpoint import is_engine_dir, read_checkpoint
from gpt2.convert import DestinationExistsError, InterruptedConversionWarning, convert

REPO = Path(__file__).resolve().parent.parent

# python -c KILLED_CONVERT SRC DST POINT: convert(SRC, DST, force=True), SIGKILLed at POINT, which is
# "writing" (the weights file written, the .partial directory not yet complete) or "rename-N" (just after
# convert's N-th os.rename).
KILLED_CONVERT = """
import importlib, os, signal, sys

module = importlib.import_module("gpt2.convert")  # the attribute gpt2.convert is the function
src, dst, point = sys.argv[1:]

def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "writing":
    save_file = module.save_file
    module.save_file = lambda *args, **kwargs: die(save_file(*args, **kwargs))
else:
    rename, renames, last = os.rename, [], int(point.removeprefix("rename-"))
    def counted_rename(a, b):
        rename(a, b)
        renames.append(a)
        if len(renames) == last:
            die()
    os.rename = counted_rename
module.convert(src, dst, force=True, progress=False)
"""


def convert_killed(src: Path, dst: Path, point: str) -> None:
    """Run a --force conversion of src into dst in a subprocess that SIGKILLs itself at point."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", KILLED_CONVERT, str(src), str(dst), point],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".partial", ".old")))


def weights_dtype(engine_dir: Path) -> torch.dtype:
    return read_checkpoint(engine_dir)[1]["wte.weight"].dtype


@pytest.mark.parametrize("existing", [False, True], ids=["new-dst", "replacing-dst"])
def test_killed_while_writing(existing, checkpoints, tmp_path):
    dst = tmp_path / "model"
    if existing:
        convert(checkpoints["hf-safetensors"], dst, progress=False)
    convert_killed(checkpoints["hf-bin-fp16"], dst, "writing")
    [partial] = leftovers(tmp_path)
    assert partial.startswith(".model.") and partial.endswith(".partial")
    assert (tmp_path / partial / "model.safetensors").stat().st_size > 0
    assert is_engine_dir(dst) == existing  # the previous model untouched
    unrelated = [".other.0123abcd.partial", ".model.0123abcd.partial.txt", ".model.0123ABCD.old", ".model.xyz.old"]
    for name in unrelated:
        (tmp_path / name).mkdir()

    with pytest.warns(InterruptedConversionWarning, match=f"removed leftovers of killed conversions into {dst} "
                                                          f"from {tmp_path}: {re.escape(partial)}$"):
        convert(checkpoints["hf-bin-fp16"], dst, force=True, progress=False)
    assert weights_dtype(dst) == torch.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*unrelated, "model"])  # DST's own, matched exactly


@pytest.mark.parametrize("force", [False, True])
def test_force_killed_between_the_renames_restores_the_previous_model(force, checkpoints, tmp_path):
    dst = convert(checkpoints["hf-safetensors"], tmp_path / "model", progress=False)
    before = (dst / "model.safetensors").read_bytes()
    convert_killed(checkpoints["hf-bin-fp16"], dst, "rename-1")  # dst moved aside to .old, the new one not in yet
    assert not dst.exists()
    [old, partial] = leftovers(tmp_path)
    assert (tmp_path / old / "model.safetensors").read_bytes() == before

    with pytest.warns(InterruptedConversionWarning) as warned:
        if force:
            convert(checkpoints["hf-bin-fp16"], dst, force=True, progress=False)
        else:
            with pytest.raises(DestinationExistsError, match="already exists; pass --force"):
                convert(checkpoints["hf-bin-fp16"], dst, progress=False)
    assert [str(w.message) for w in warned] == [
        f"restored {dst} from {old}: a `gpt2 convert --force` into it was killed after moving the previous model "
        "aside, before putting the new one in place",
        f"removed leftovers of killed conversions into {dst} from {tmp_path}: {partial}",
    ]
    if force:
        assert weights_dtype(dst) == torch.float16
    else:
        assert (dst / "model.safetensors").read_bytes() == before
    assert leftovers(tmp_path) == []


def test_force_killed_before_removing_the_previous_model(checkpoints, tmp_path):
    dst = convert(checkpoints["hf-safetensors"], tmp_path / "model", progress=False)
    convert_killed(checkpoints["hf-bin-fp16"], dst, "rename-2")  # the new model in place, the previous one in .old
    [old] = leftovers(tmp_path)
    assert old.endswith(".old") and weights_dtype(dst) == torch.float16

    with pytest.warns(InterruptedConversionWarning, match=f"removed leftovers .*: {re.escape(old)}$"):
        convert(checkpoints["hf-safetensors"], dst, force=True, progress=False)
    assert weights_dtype(dst) == torch.float32
    assert leftovers(tmp_path) == []


def test_several_moved_aside_models_restore_the_newest(checkpoints, tmp_path):
    """Leftovers of runs from before the cleanup existed: the model moved aside last is the user's latest."""
    dst = tmp_path / "model"
    os.rename(convert(checkpoints["hf-safetensors"], tmp_path / "a", progress=False), tmp_path / ".model.ffff0000.old")
    time.sleep(0.05)  # distinct ctimes: a rename sets one
    os.rename(convert(checkpoints["hf-bin-fp16"], tmp_path / "b", progress=False), tmp_path / ".model.0000aaaa.old")

    with pytest.warns(InterruptedConversionWarning) as warned:
        with pytest.raises(DestinationExistsError):
            convert(checkpoints["hf-safetensors"], dst, progress=False)
    restored, removed = (str(w.message) for w in warned)
    assert restored.startswith(f"restored {dst} from .model.0000aaaa.old: ")
    assert removed == f"removed leftovers of killed conversions into {dst} from {tmp_path}: .model.ffff0000.old"
    assert weights_dtype(dst) == torch.float16
    assert leftovers(tmp_path) == []


def test_a_running_conversion_is_waited_for_not_cleaned_up(checkpoints, tmp_path, monkeypatch):
    """A second conversion into the same place waits for the first, keeps its .partial, then sees its DST."""
    module = importlib.import_module("gpt2.convert")
    first_writing, first_may_finish, second_locking = threading.Event(), threading.Event(), threading.Event()
    save_file, flock, locks = module.save_file, module.fcntl.flock, []

    def held_save_file(*args, **kwargs):
        save_file(*args, **kwargs)
        first_writing.set()
        assert first_may_finish.wait(timeout=60)

    def counted_flock(fd, operation):
        locks.append(fd)
        if len(locks) == 2:
            second_locking.set()
        flock(fd, operation)

    monkeypatch.setattr(module, "save_file", held_save_file)
    monkeypatch.setattr(module.fcntl, "flock", counted_flock)
    dst, outcome = tmp_path / "model", {}

    def run(which: str) -> None:
        try:
            outcome[which] = convert(checkpoints["hf-bin-fp16"], dst, progress=False)
        except Exception as e:  # reported by the asserts below
            outcome[which] = e

    first = threading.Thread(target=run, args=("first",))
    first.start()
    assert first_writing.wait(timeout=60)
    [partial] = leftovers(tmp_path)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    assert second_locking.wait(timeout=60)
    time.sleep(0.2)  # the second conversion is blocked in flock now
    assert second.is_alive() and leftovers(tmp_path) == [partial]
    first_may_finish.set()
    first.join(timeout=60)
    second.join(timeout=60)
    assert outcome["first"] == dst and is_engine_dir(dst)
    assert isinstance(outcome["second"], DestinationExistsError)
    assert leftovers(tmp_path) == []
