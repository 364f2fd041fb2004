"""Reading every checkpoint format into the engine layout, and inferring the model size from shapes."""

from __future__ import annotations

import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2.checkpoint import (
    CheckpointNotFoundError,
    ConfigMismatchError,
    NonFiniteWeightsWarning,
    engine_shapes,
    read_checkpoint,
    to_engine_state_dict,
)
from gpt2.config import ConfigError, GPT2Config
from tests.checkpoints import FORMATS, FP16_FORMATS

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def expected_engine_tensors(reference) -> dict[str, torch.Tensor]:
    """The reference's weights in the engine layout, written out independently of gpt2.checkpoint."""
    out = {}
    for key, value in reference.state_dict().items():
        if key.startswith("transformer."):
            name = key.removeprefix("transformer.")
            out[name] = value.t() if name.endswith(CONV1D) else value
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_reference_tensors(fmt, checkpoints, reference_model, tiny_config):
    config, state_dict = read_checkpoint(checkpoints[fmt], config=tiny_config)
    assert config == tiny_config
    expected = expected_engine_tensors(reference_model)
    assert list(state_dict) == list(engine_shapes(tiny_config))
    assert set(state_dict) == set(expected)
    for name, value in state_dict.items():
        assert value.is_contiguous(), name
        if fmt in FP16_FORMATS:  # fp16 stays fp16: exactly the reference rounded to fp16
            assert value.dtype == torch.float16, name
            assert torch.equal(value, expected[name].half()), name
        else:
            assert value.dtype == torch.float32, name
            assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("fmt", ["hf-safetensors", "hf-bin-fp16"])
def test_hf_directory_uses_its_config_json(fmt, checkpoints, tiny_config):
    config, _ = read_checkpoint(checkpoints[fmt])
    assert config == tiny_config


def test_preset_or_config_file_override_config_json(checkpoints, tiny_config, tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"n_embd": 64, "n_layer": 2, "n_head": 8, "n_positions": 128}')
    config, _ = read_checkpoint(checkpoints["hf-safetensors"], config=path)
    assert config.n_head == 8
    with pytest.raises(ConfigError, match="either a preset or a config"):
        read_checkpoint(checkpoints["hf-safetensors"], preset="dialogpt-small", config=path)


def test_safetensors_prefered_over_bin_in_a_directory(checkpoints, tmp_path):
    directory = tmp_path / "both"
    shutil.copytree(checkpoints["hf-safetensors"], directory)
    shutil.copyfile(checkpoints["hf-bin-fp16"] / "pytorch_model.bin", directory / "pytorch_model.bin")
    _, state_dict = read_checkpoint(directory)
    assert state_dict["wte.weight"].dtype == torch.float32  # from model.safetensors, not the fp16 .bin


def test_engine_layout_without_marker_is_recognised(checkpoints, tiny_config, tmp_path):
    """A plain torch.save of the engine's own state dict ([out, in] weights, no marker) reads back unchanged."""
    _, state_dict = read_checkpoint(checkpoints["safetensors-file"], config=tiny_config)
    torch.save(state_dict, tmp_path / "engine.pt")
    _, again = read_checkpoint(tmp_path / "engine.pt", config=tiny_config)
    assert all(torch.equal(again[k], v) for k, v in state_dict.items())


def test_engine_marker_means_out_in_layout(checkpoints, tiny_config, tmp_path):
    _, state_dict = read_checkpoint(checkpoints["safetensors-file"], config=tiny_config)
    save_file(state_dict, tmp_path / "engine.safetensors", metadata={"format": "dialogpt-engine"})
    _, again = read_checkpoint(tmp_path / "engine.safetensors", config=tiny_config)
    assert all(torch.equal(again[k], v) for k, v in state_dict.items())


def shape_only_state_dict(config: GPT2Config, style: str) -> dict[str, torch.Tensor]:
    """Meta tensors with a released checkpoint's names and Conv1D shapes (no memory, values irrelevant)."""
    raw = {}
    for name, shape in engine_shapes(config).items():
        stored = shape[::-1] if name.endswith(CONV1D) else shape
        raw[name] = torch.empty(stored, dtype=torch.float16, device="meta")
    for i in range(config.n_layer):
        raw[f"h.{i}.attn.bias"] = torch.empty(1, 1, config.n_positions, config.n_positions, device="meta")
    prefix = {"hf": "transformer.", "module": "module.transformer.", "transformer-only": ""}[style]
    return {prefix + k: v for k, v in raw.items()}


@pytest.mark.parametrize("preset", ["dialogpt-small", "dialogpt-medium", "dialogpt-large", "gpt2-xl"])
@pytest.mark.parametrize("style", ["hf", "module", "transformer-only"])
def test_size_inferred_from_shapes(preset, style):
    expected = GPT2Config.from_preset(preset)
    config, state_dict = to_engine_state_dict(shape_only_state_dict(expected, style), source="weights.pkl")
    assert config == expected
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == engine_shapes(expected)


def test_inferred_layer_count_and_positions_follow_the_tensors():
    odd = GPT2Config(n_embd=768, n_head=12, n_layer=3, n_positions=256)
    config, _ = to_engine_state_dict(shape_only_state_dict(odd, "hf"), source="weights.pkl")
    assert (config.n_layer, config.n_positions) == (3, 256)


def test_unknown_width_needs_a_config(checkpoints, tiny_config):
    with pytest.raises(ConfigMismatchError, match=r"n_embd=64 .*--config FILE.*--preset NAME") as err:
        read_checkpoint(checkpoints["pkl"])
    assert str(checkpoints["pkl"]) in str(err.value)
    config, _ = read_checkpoint(checkpoints["pkl"], config=tiny_config)
    assert config == tiny_config


def test_preset_checked_against_medium_shapes():
    medium = shape_only_state_dict(GPT2Config.from_preset("dialogpt-medium"), "hf")
    config, _ = to_engine_state_dict(medium, source="medium_ft.pkl", config=GPT2Config.from_preset("dialogpt-medium"))
    assert config.n_embd == 1024
    with pytest.raises(ConfigMismatchError, match=r"expects key 'transformer.wte.weight' of shape \(50257, 768\), "
                                                  r"but medium_ft.pkl has \(50257, 1024\)"):
        to_engine_state_dict(medium, source="medium_ft.pkl", config=GPT2Config.from_preset("dialogpt-small"),
                             config_origin="preset 'dialogpt-small'")


@pytest.mark.parametrize("fmt", FORMATS)
def test_finite_weights_read_without_a_warning(fmt, checkpoints, tiny_config):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWeightsWarning)
        read_checkpoint(checkpoints[fmt], config=tiny_config)


def test_non_finite_weights_are_read_with_a_warning_naming_them(checkpoints, tiny_config, tmp_path):
    weights = load_file(checkpoints["safetensors-file"])
    weights["transformer.h.0.attn.c_attn.weight"][0, :3] = torch.nan
    weights["transformer.ln_f.bias"][7] = -torch.inf
    save_file(weights, tmp_path / "bad.safetensors")
    with pytest.warns(NonFiniteWeightsWarning) as warned:
        _, state_dict = read_checkpoint(tmp_path / "bad.safetensors", config=tiny_config)
    assert [str(w.message).split("; ")[0] for w in warned] == [
        f"{tmp_path / 'bad.safetensors'}: 2 tensor(s) hold NaN or inf: 'transformer.h.0.attn.c_attn.weight' "
        "(3 of 12288 values), 'transformer.ln_f.bias' (1 of 64 values)"]
    assert state_dict["h.0.attn.c_attn.weight"][:3, 0].isnan().all() and state_dict["ln_f.bias"][7] == -torch.inf


def test_tied_lm_head_holding_nan_is_still_tied(checkpoints, tmp_path):
    """NaN != NaN: an lm_head equal to wte, NaN included, is the tied head, not a different one."""
    weights = torch.load(checkpoints["hf-bin-fp16"] / "pytorch_model.bin", weights_only=True)
    weights["transformer.wte.weight"][5] = torch.nan
    weights["lm_head.weight"] = weights["transformer.wte.weight"].clone()
    shutil.copytree(checkpoints["hf-bin-fp16"], tmp_path / "nan")
    torch.save(weights, tmp_path / "nan" / "pytorch_model.bin")
    with pytest.warns(NonFiniteWeightsWarning, match=r"'transformer.wte.weight' \(64 of 3216448 values\)"):
        read_checkpoint(tmp_path / "nan")


def test_symlink_loop_named(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"{tmp_path / 'loop'} is a symlink loop")):
        read_checkpoint(tmp_path / "loop")
