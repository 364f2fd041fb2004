"""`convert` and `gpt2 convert`: a self-contained engine directory, written atomically, never clobbering."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gpt2
from gpt2.checkpoint import ENGINE_FORMAT, NonFiniteWeightsWarning, is_engine_dir, read_checkpoint
from gpt2.cli import main
from gpt2.config import GPT2Config
from gpt2.convert import ConvertError, DestinationExistsError, DtypeOverflowError, convert
from gpt2.tokenizer import VOCAB_DIR
from tests.checkpoints import FORMATS, FP16_FORMATS

REPO = Path(__file__).resolve().parent.parent


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith((".partial", ".old"))]


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_every_format(fmt, checkpoints, tiny_config, tmp_path):
    dst = convert(checkpoints[fmt], tmp_path / "out", config=tiny_config, progress=False)
    assert dst == tmp_path / "out"
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    raw = json.loads((dst / "config.json").read_text())
    assert raw["engine_format"] == ENGINE_FORMAT and raw["model_type"] == "gpt2"
    assert GPT2Config.from_dict(raw) == tiny_config
    assert (dst / "model.safetensors").stat().st_mode == (dst / "config.json").stat().st_mode
    with safe_open(dst / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": ENGINE_FORMAT}
    for name in ("vocab.json", "merges.txt"):
        assert (dst / name).read_bytes() == (VOCAB_DIR / name).read_bytes()
    _, source = read_checkpoint(checkpoints[fmt], config=tiny_config)
    config, converted = read_checkpoint(dst)
    assert config == tiny_config
    assert all(torch.equal(converted[k], v) for k, v in source.items())  # dtype kept: fp16 stays fp16
    assert converted["wte.weight"].dtype == (torch.float16 if fmt in FP16_FORMATS else torch.float32)
    assert _leftovers(tmp_path) == []


def test_dtype_override(checkpoints, tmp_path):
    dst = convert(checkpoints["hf-bin-fp16"], tmp_path / "bf16", dtype=torch.bfloat16, progress=False)
    _, state_dict = read_checkpoint(dst)
    assert {v.dtype for v in state_dict.values()} == {torch.bfloat16}
    with pytest.raises(ConvertError, match="dtype torch.int8 is not supported"):
        convert(checkpoints["hf-bin-fp16"], tmp_path / "int8", dtype=torch.int8)


def weights_with(checkpoints, path: Path, values: dict[tuple[str, tuple[int, ...]], float]) -> Path:
    """The fp32 safetensors-file checkpoint written to path with values[(key, index)] set; returns path."""
    weights = load_file(checkpoints["safetensors-file"])
    for (key, index), value in values.items():
        weights[key][index] = value
    save_file(weights, path)
    return path


def test_cast_that_overflows_is_refused(checkpoints, tiny_config, tmp_path, capsys):
    src = weights_with(checkpoints, tmp_path / "large.safetensors",
                       {("transformer.h.1.mlp.c_proj.weight", (3, 5)): -1e5})
    message = (f"{src}: tensor 'h.1.mlp.c_proj.weight' holds values up to 100000 in magnitude, beyond "
               "torch.float16's largest 65504: they would be stored as inf")
    with pytest.raises(DtypeOverflowError, match=f"^{re.escape(message)}"):
        convert(src, tmp_path / "fp16", config=tiny_config, dtype=torch.float16, progress=False)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config.to_dict()))
    assert main(["convert", str(src), str(tmp_path / "fp16"), "--dtype", "fp16", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith(f"gpt2 convert: error: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large.safetensors", "tiny.json"]  # nothing written

    dst = convert(src, tmp_path / "bf16", config=tiny_config, dtype=torch.bfloat16, progress=False)
    assert read_checkpoint(dst)[1]["h.1.mlp.c_proj.weight"][5, 3] == -1e5  # bf16 has fp32's range
    edge = weights_with(checkpoints, tmp_path / "edge.safetensors", {("transformer.wte.weight", (0, 0)): 65519.0})
    dst = convert(edge, tmp_path / "edge", config=tiny_config, dtype=torch.float16, progress=False)
    assert read_checkpoint(dst)[1]["wte.weight"][0, 0] == 65504  # rounds to fp16's largest, not to inf


def test_non_finite_weights_convert_and_load_with_a_warning(checkpoints, tiny_config, tmp_path):
    bad = {("transformer.h.0.ln_1.weight", (1,)): torch.nan, ("transformer.wpe.weight", (2, 3)): -torch.inf}
    src = weights_with(checkpoints, tmp_path / "bad.safetensors", bad)
    read = "2 tensor(s) hold NaN or inf: 'transformer.wpe.weight' (1 of 8192 values), 'transformer.h.0.ln_1.weight'"
    with pytest.warns(NonFiniteWeightsWarning, match=re.escape(f"{src}: {read}")):  # and -inf is no fp16 overflow
        dst = convert(src, tmp_path / "fp16", config=tiny_config, dtype=torch.float16, progress=False)
    loaded = "2 tensor(s) hold NaN or inf: 'wpe.weight' (1 of 8192 values), 'h.0.ln_1.weight' (1 of 64 values)"
    with pytest.warns(NonFiniteWeightsWarning, match=re.escape(f"{dst / 'model.safetensors'}: {loaded}")):
        model = gpt2.load(dst)
    assert model.state_dict()["wpe.weight"][2, 3] == -torch.inf


@pytest.mark.parametrize("which", ["source", "destination", "destination-parent"])
def test_symlink_loop_refused(which, checkpoints, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "back")
    (tmp_path / "back").symlink_to(loop)
    src, dst = {"source": (loop, tmp_path / "out"), "destination": (checkpoints["pkl"], loop),
                "destination-parent": (checkpoints["pkl"], loop / "out")}[which]
    path = src if which == "source" else dst
    message = f"{which.removesuffix('-parent')} {path} is a symlink loop"
    with pytest.raises(ConvertError, match=re.escape(message)):
        convert(src, dst, progress=False)
    assert main(["convert", str(src), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpt2 convert: error: {message}") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "loop"]


def test_converting_an_engine_directory_again(checkpoints, tmp_path):
    first = convert(checkpoints["hf-safetensors"], tmp_path / "a", progress=False)
    second = convert(first, tmp_path / "b", progress=False)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_existing_destination_needs_force(checkpoints, tmp_path):
    dst = convert(checkpoints["hf-safetensors"], tmp_path / "out", progress=False)
    before = (dst / "model.safetensors").read_bytes()
    with pytest.raises(DestinationExistsError, match=r"out already exists; pass --force"):
        convert(checkpoints["hf-bin-fp16"], dst, progress=False)
    assert (dst / "model.safetensors").read_bytes() == before
    convert(checkpoints["hf-bin-fp16"], dst, force=True, progress=False)
    _, state_dict = read_checkpoint(dst)
    assert state_dict["wte.weight"].dtype == torch.float16
    assert _leftovers(tmp_path) == []


def test_force_never_replaces_other_data(checkpoints, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ConvertError, match="not a model directory written by `gpt2 convert`"):
        convert(checkpoints["hf-safetensors"], precious, force=True, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("keep me too")
    with pytest.raises(ConvertError, match="not a model directory"):
        convert(checkpoints["hf-safetensors"], tmp_path / "file", force=True, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert is_engine_dir(convert(checkpoints["hf-safetensors"], empty, force=True, progress=False))


def test_destination_inside_source_refused(checkpoints, tmp_path):
    src = checkpoints["hf-safetensors"]
    for dst in (src, src / "converted"):
        with pytest.raises(ConvertError, match="is the source .* or inside it"):
            convert(src, dst, force=True, progress=False)
    pkl = checkpoints["pkl"]
    with pytest.raises(ConvertError, match="is the source"):
        convert(pkl, pkl, force=True, progress=False)
    assert not (src / "converted").exists()


def test_source_inside_destination_refused_with_force(checkpoints, tiny_config, tmp_path):
    dst = convert(checkpoints["pkl"], tmp_path / "engine", config=tiny_config, progress=False)
    inner = dst / "original.pkl"
    inner.write_bytes(checkpoints["pkl"].read_bytes())
    with pytest.raises(ConvertError, match="contains the source"):
        convert(inner, dst, config=tiny_config, force=True, progress=False)
    assert inner.exists()


def test_failure_while_writing_keeps_the_old_destination(checkpoints, tmp_path, monkeypatch):
    dst = convert(checkpoints["hf-safetensors"], tmp_path / "out", progress=False)
    before = (dst / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    module = importlib.import_module("gpt2.convert")  # the attribute gpt2.convert is the function
    monkeypatch.setattr(module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert(checkpoints["hf-bin-fp16"], dst, force=True, progress=False)
    assert (dst / "model.safetensors").read_bytes() == before
    assert _leftovers(tmp_path) == []
    with pytest.raises(OSError, match="No space left"):
        convert(checkpoints["hf-bin-fp16"], tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []


def test_missing_parent_directories_are_created(checkpoints, tmp_path):
    assert is_engine_dir(convert(checkpoints["hf-safetensors"], tmp_path / "a" / "b" / "c", progress=False))


def test_cli_convert(checkpoints, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(["convert", str(checkpoints["pkl-module"]), str(dst), "--preset", "dialogpt-small", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2 convert: error: preset 'dialogpt-small'") and "pkl_module.pkl" in err
    assert "Traceback" not in err and not dst.exists()

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128).to_dict()))
    args = ["convert", str(checkpoints["pkl-module"]), str(dst), "--config", str(config), "--no-progress"]
    assert main([*args, "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out == f"wrote {dst}\n"
    assert read_checkpoint(dst)[1]["wte.weight"].dtype == torch.float32

    assert main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert read_checkpoint(dst)[1]["wte.weight"].dtype == torch.float16

    assert main(["convert", "a", "b", "--preset", "x", "--config", "y"]) == 2  # argparse: not both
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["convert", "a", "b", "--dtype", "int8"]) == 2
    assert main(["convert", str(checkpoints["pkl"]), str(tmp_path / "x"), "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_command_line_entry_points(checkpoints, tmp_path):
    dst = tmp_path / "out"
    done = _run("-m", "gpt2.cli", "convert", str(checkpoints["hf-bin-fp16"]), str(dst), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {dst}\n" and is_engine_dir(dst)
    refused = _run("-m", "gpt2.cli", "convert", str(checkpoints["hf-bin-fp16"]), str(dst))
    assert refused.returncode == 2
    assert refused.stderr.startswith("gpt2 convert: error: destination") and "Traceback" not in refused.stderr
