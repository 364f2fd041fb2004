"""Every bad input is a clear error naming the file and the key, never a stack trace from inside torch."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gpt2.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigMismatchError,
    CorruptCheckpointError,
    MissingKeyError,
    TensorDtypeError,
    TensorShapeError,
    TiedWeightsError,
    UnexpectedKeyError,
    UnsafePickleError,
    read_checkpoint,
)
from gpt2.cli import main
from gpt2.config import ConfigError
from gpt2.convert import DestinationExistsError, convert


@pytest.fixture()
def hf_tensors(reference_model) -> dict[str, torch.Tensor]:
    """The reference's `transformer.*` tensors, fp32, to damage one way or another."""
    return {k: v.clone() for k, v in reference_model.state_dict().items() if k.startswith("transformer.")}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(tensors, path)
    else:
        torch.save(tensors, path, _use_new_zipfile_serialization=path.suffix != ".pkl")
    return path


@pytest.fixture()
def read_damaged(hf_tensors, tiny_config, tmp_path) -> Callable[[str], object]:
    """read_damaged(name): hf_tensors, as the test left them, saved to tmp_path / name and read with tiny_config."""
    return lambda name: read_checkpoint(_save(hf_tensors, tmp_path / name), config=tiny_config)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pkl"])
def test_missing_key(hf_tensors, read_damaged, suffix):
    del hf_tensors["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(MissingKeyError, match=r"weights\S*: missing 1 key\(s\): 'transformer.h.1.mlp.c_fc.bias'"):
        read_damaged(f"weights{suffix}")


def test_missing_embedding(hf_tensors, read_damaged):
    del hf_tensors["transformer.wte.weight"]
    with pytest.raises(MissingKeyError, match=r"weights.safetensors: missing key 'transformer.wte.weight'"):
        read_damaged("weights.safetensors")


def test_missing_whole_layer_with_config(hf_tensors, read_damaged):
    for key in [k for k in hf_tensors if k.startswith("transformer.h.1.")]:
        del hf_tensors[key]
    with pytest.raises(ConfigMismatchError, match=r"says n_layer=2, but \S*weights.bin holds 1 blocks"):
        read_damaged("weights.bin")


def test_unexpected_key(hf_tensors, read_damaged):
    hf_tensors["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)
    with pytest.raises(UnexpectedKeyError, match=r"weights.safetensors: unexpected key\(s\).*'transformer.h.0.attn.rotary"):
        read_damaged("weights.safetensors")


def test_same_weight_under_two_names(hf_tensors, read_damaged):
    hf_tensors["wte.weight"] = hf_tensors["transformer.wte.weight"].clone()
    with pytest.raises(UnexpectedKeyError, match=r"'transformer.wte.weight' and 'wte.weight' are both"):
        read_damaged("weights.safetensors")


def test_wrong_shape(hf_tensors, read_damaged):
    hf_tensors["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 200)
    with pytest.raises(TensorShapeError, match=r"weights.pkl: key 'transformer.h.1.mlp.c_fc.weight' has shape "
                                               r"\(64, 200\), expected \(64, 256\) \(Conv1D layout \[in, out\]\)"):
        read_damaged("weights.pkl")


def test_layer_norm_wrong_shape(hf_tensors, read_damaged):
    hf_tensors["transformer.ln_f.bias"] = torch.zeros(65)
    with pytest.raises(TensorShapeError, match=r"'transformer.ln_f.bias' has shape \(65,\), expected \(64,\)"):
        read_damaged("w.safetensors")


def test_non_float_tensor(hf_tensors, read_damaged):
    hf_tensors["transformer.h.0.ln_1.bias"] = torch.arange(64)
    with pytest.raises(TensorDtypeError, match=r"weights.safetensors: key 'transformer.h.0.ln_1.bias' holds torch.int64"):
        read_damaged("weights.safetensors")


def test_untied_lm_head(hf_tensors, read_damaged):
    hf_tensors["lm_head.decoder.weight"] = hf_tensors["transformer.wte.weight"] + 1
    with pytest.raises(TiedWeightsError, match=r"weights.pkl: 'lm_head.decoder.weight' differs from 'transformer.wte"):
        read_damaged("weights.pkl")


@pytest.mark.parametrize("fmt", ["hf-safetensors", "safetensors-file"])
def test_truncated_safetensors(checkpoints, fmt, tmp_path):
    src = checkpoints[fmt]
    src = src / "model.safetensors" if src.is_dir() else src
    data = src.read_bytes()
    for n, cut in enumerate((len(data) // 2, 5, 0)):
        path = tmp_path / f"cut{n}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpointError, match=rf"cut{n}.safetensors: not a readable safetensors file"):
            read_checkpoint(path)


def test_truncated_safetensors_in_a_directory(checkpoints, tmp_path):
    directory = tmp_path / "hf"
    shutil.copytree(checkpoints["hf-safetensors"], directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match=r"hf/model.safetensors: .*truncated or corrupt"):
        read_checkpoint(directory)


@pytest.mark.parametrize("source", ["pkl", "hf-bin-fp16"])  # legacy pickle, zip pickle
def test_truncated_pickle(checkpoints, source, tmp_path):
    src = checkpoints[source]
    data = (src / "pytorch_model.bin" if src.is_dir() else src).read_bytes()
    for n, cut in enumerate((len(data) // 2, 40, 0)):
        path = tmp_path / f"cut{n}.bin"
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpointError, match=rf"cut{n}.bin: not a readable PyTorch checkpoint"):
            read_checkpoint(path)


@pytest.mark.parametrize("suffix", [".bin", ".pkl", ".pt", ".safetensors"])
def test_corrupt_bytes(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CorruptCheckpointError, match=rf"garbage{suffix}: not a readable"):
        read_checkpoint(path)


def test_pickle_of_something_else(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CorruptCheckpointError, match=r"tensor.pt: holds a Tensor, expected a state dict"):
        read_checkpoint(tmp_path / "tensor.pt")
    torch.save({"state_dict": {"wte.weight": torch.zeros(2)}}, tmp_path / "nested.pt")
    with pytest.raises(CorruptCheckpointError, match=r"nested.pt: key 'state_dict' holds a dict"):
        read_checkpoint(tmp_path / "nested.pt")


class _CreatesFile:
    """Unpickling this calls open(marker, "w"): stands in for any code a malicious pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_code_running_pickle_is_refused_and_does_not_run(reference_model, tmp_path, zip_format):
    marker = tmp_path / "pwned"
    payload = dict(reference_model.state_dict())
    payload["transformer.h.0.attn.bias"] = _CreatesFile(marker)
    path = tmp_path / "evil.pkl"
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafePickleError, match=r"evil.pkl: refused to load: this pickle asks for \S*open"):
        read_checkpoint(path)
    assert not marker.exists()


def test_config_disagreeing_with_tensors(checkpoints, tmp_path):
    """The old hub config mistake: a config.json saying n_embd=768 beside medium-width weights."""
    directory = tmp_path / "hf"
    shutil.copytree(checkpoints["hf-safetensors"], directory)
    raw = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**raw, "n_embd": 32, "n_head": 4}))
    with pytest.raises(ConfigMismatchError, match=r"hf/config.json \(n_embd=32.*\) expects key "
                                                  r"'transformer.wte.weight' of shape \(50257, 32\), but "
                                                  r"\S*hf/model.safetensors has \(50257, 64\)"):
        read_checkpoint(directory)
    (directory / "config.json").write_text(json.dumps({**raw, "n_positions": 1024}))
    with pytest.raises(ConfigMismatchError, match=r"'transformer.wpe.weight' of shape \(1024, 64\), but .* \(128, 64\)"):
        read_checkpoint(directory)
    (directory / "config.json").write_text(json.dumps({**raw, "n_layer": 3}))
    with pytest.raises(ConfigMismatchError, match=r"says n_layer=3, but .* holds 2 blocks"):
        read_checkpoint(directory)


def test_unknown_preset(checkpoints):
    with pytest.raises(ConfigError, match=r"unknown preset 'dialogpt-huge'; known presets: dialogpt-large"):
        read_checkpoint(checkpoints["pkl"], preset="dialogpt-huge")


def test_unsupported_config(checkpoints, tmp_path):
    directory = tmp_path / "hf"
    shutil.copytree(checkpoints["hf-safetensors"], directory)
    raw = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**raw, "activation_function": "relu"}))
    with pytest.raises(ConfigError, match=r"hf/config.json: activation_function 'relu' is not supported"):
        read_checkpoint(directory)
    (directory / "config.json").write_text("{broken")
    with pytest.raises(ConfigError, match=r"hf/config.json: not valid JSON"):
        read_checkpoint(directory)
    with pytest.raises(ConfigError, match=r"config file not found: \S*nope.json"):
        read_checkpoint(checkpoints["pkl"], config=tmp_path / "nope.json")


def test_missing_file_or_weights(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"checkpoint not found: \S*nothing-here.pkl"):
        read_checkpoint(tmp_path / "nothing-here.pkl")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "tf_model.h5").write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match=r"dir: no model.safetensors or pytorch_model.bin .*found: tf_model.h5"):
        read_checkpoint(tmp_path / "dir")


def test_destination_exists(checkpoints, tmp_path):
    (tmp_path / "dst").mkdir()
    with pytest.raises(DestinationExistsError, match=r"dst already exists"):
        convert(checkpoints["hf-safetensors"], tmp_path / "dst", progress=False)


def test_errors_are_value_errors():
    for error in (CheckpointError, ConfigError, DestinationExistsError):
        assert issubclass(error, ValueError)


@pytest.mark.parametrize("case", ["missing-file", "corrupt", "unsafe", "bad-config"])
def test_cli_reports_bad_input_without_traceback(case, checkpoints, tmp_path, capsys):
    src = tmp_path / "src.pkl"
    extra = []
    if case == "corrupt":
        src.write_bytes(b"\x80\x02garbage")
    elif case == "unsafe":
        torch.save({"x": _CreatesFile(tmp_path / "pwned")}, src)
    elif case == "bad-config":
        src, extra = checkpoints["pkl"], ["--config", str(tmp_path / "missing.json")]
    assert main(["convert", str(src), str(tmp_path / "dst"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2 convert: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "dst").exists()
