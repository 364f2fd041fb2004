"""`gpt2.load` from every kind of source, with logits equal to the reference's; hub ids through a local cache."""

from __future__ import annotations

import importlib
import shutil

import huggingface_hub.constants
import pytest
import torch

import gpt2
from gpt2 import checkpoint
from gpt2.checkpoint import ConfigMismatchError, is_engine_dir
from gpt2.convert import convert
from gpt2.loading import ModelNotFoundError
from tests.checkpoints import FORMATS, FP16_FORMATS, with_weights_rounded

ATOL = 1e-4
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def reference_logits(reference_model, token_ids) -> dict[str, torch.Tensor]:
    """Logits of the fp32 reference, and of the reference with weights rounded through fp16."""
    with torch.no_grad():
        return {"fp32": reference_model(token_ids).logits,
                "fp16": with_weights_rounded(reference_model)(token_ids).logits}


def _logits(model, token_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(token_ids).float()


@pytest.fixture()
def tiny_width_inferable(monkeypatch, tiny_config):
    """Let the size inference know the tiny test width, as it knows the released ones."""
    monkeypatch.setitem(checkpoint.N_HEAD_BY_WIDTH, tiny_config.n_embd, tiny_config.n_head)


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_every_format_matches_reference(fmt, checkpoints, reference_logits, token_ids, tiny_config,
                                             tiny_width_inferable):
    model = gpt2.load(checkpoints[fmt])
    assert isinstance(model, gpt2.GPT2) and not model.training
    assert model.config == tiny_config
    assert model.wte.weight.dtype == torch.float32
    expected = reference_logits["fp16" if fmt in FP16_FORMATS else "fp32"]
    assert (_logits(model, token_ids) - expected).abs().max().item() <= ATOL
    assert model.tokenizer.encode("Hello world") == [15496, 995]


def test_load_engine_directory(checkpoints, reference_logits, token_ids, tiny_config, tmp_path):
    dst = convert(checkpoints["pkl-module"], tmp_path / "engine", config=tiny_config, progress=False)
    model = gpt2.load(str(dst))
    assert (_logits(model, token_ids) - reference_logits["fp16"]).abs().max().item() <= ATOL
    assert model.tokenizer.eos_token_id == 50256


def test_load_dtype_and_device(checkpoints, token_ids, reference_logits):
    model = gpt2.load(checkpoints["hf-safetensors"], device="cpu", dtype=torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16 and model.device == torch.device("cpu")
    with pytest.raises(ValueError, match="dtype torch.int32 is not supported"):
        gpt2.load(checkpoints["hf-safetensors"], dtype=torch.int32)
    with pytest.raises(ValueError, match="invalid device 'gpu:0'"):
        gpt2.load(checkpoints["hf-safetensors"], device="gpu:0")


def test_single_file_of_unknown_width_needs_convert(checkpoints):
    with pytest.raises(ConfigMismatchError, match="number of attention heads cannot be inferred"):
        gpt2.load(checkpoints["pkl"])


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"nope/x/y: no such file or directory"):
        gpt2.load(tmp_path / "nope" / "x" / "y")


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache under tmp_path and an empty engine cache; returns the hub cache root."""
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("GPT2_ENGINE_CACHE", str(tmp_path / "engine-cache"))
    return cache


def _put_in_hub_cache(cache, repo_id: str, source_dir, files: list[str]) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    snapshot = repo / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    for name in files:
        shutil.copyfile(source_dir / name, snapshot / name)


@pytest.mark.parametrize(("fmt", "weights"), [("hf-safetensors", "model.safetensors"),
                                              ("hf-bin-fp16", "pytorch_model.bin")])
def test_hub_id_from_local_cache_is_converted_once(fmt, weights, hub, checkpoints, reference_logits, token_ids,
                                                   tmp_path, monkeypatch):
    _put_in_hub_cache(hub, "microsoft/DialoGPT-small", checkpoints[fmt],
                      ["config.json", "vocab.json", "merges.txt", weights])
    loading = importlib.import_module("gpt2.loading")
    conversions = []
    monkeypatch.setattr(loading, "convert", lambda *a, **k: conversions.append(a) or convert(*a, **k))

    model = gpt2.load("microsoft/DialoGPT-small")
    engine_dir = tmp_path / "engine-cache" / "microsoft--DialoGPT-small" / SHA
    assert is_engine_dir(engine_dir) and len(conversions) == 1
    expected = reference_logits["fp16" if fmt == "hf-bin-fp16" else "fp32"]
    assert (_logits(model, token_ids) - expected).abs().max().item() <= ATOL

    written = (engine_dir / "model.safetensors").stat().st_mtime_ns
    again = gpt2.load("microsoft/DialoGPT-small")
    assert len(conversions) == 1 and (engine_dir / "model.safetensors").stat().st_mtime_ns == written
    assert (_logits(again, token_ids) - expected).abs().max().item() <= ATOL


def test_hub_id_not_cached_offline(hub):
    with pytest.raises(ModelNotFoundError) as err:
        gpt2.load("microsoft/DialoGPT-medium")
    message = str(err.value)
    assert "'microsoft/DialoGPT-medium' is not a local path" in message
    assert f"the hub cache {hub}" in message and "HF_HUB_OFFLINE=1" in message and "gpt2 convert SRC DST" in message and "gpt2.load(DST)" in message
