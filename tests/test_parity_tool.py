"""tools/parity.py: compares with transformers, saves the reference, checks a saved one without transformers."""

from __future__ import annotations

import sys

import pytest
from safetensors.torch import load_file, save_file

from tools import parity


def test_parity_against_transformers_and_saved_reference(checkpoints, tmp_path, capsys, monkeypatch):
    model_dir = str(checkpoints["hf-safetensors"])
    saved = tmp_path / "ref.safetensors"
    assert parity.main([model_dir, "--save-reference", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "hidden.0" in out and "logits" in out and out.rstrip().endswith("PASS")

    monkeypatch.setitem(sys.modules, "transformers", None)  # the saved file is enough
    assert parity.main([model_dir, "--reference", str(saved)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("PASS")

    tampered = load_file(saved)
    tampered["2/logits"][0, 3, 7] += 1.0
    save_file(tampered, saved)
    assert parity.main([model_dir, "--reference", str(saved)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_parity_reports_unreadable_reference(checkpoints, tmp_path, capsys):
    bad = tmp_path / "ref.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert parity.main([str(checkpoints["hf-safetensors"]), "--reference", str(bad)]) == 2
    assert "cannot read the reference file" in capsys.readouterr().err


def test_parity_both_reference_options_is_a_usage_error(checkpoints):
    with pytest.raises(SystemExit):
        parity.main([str(checkpoints["hf-safetensors"]), "--reference", "a", "--save-reference", "b"])


def test_parity_on_a_converted_directory_builds_the_reference_from_its_weights(checkpoints, tiny_config, tmp_path,
                                                                              capsys):
    import gpt2

    engine_dir = gpt2.convert(checkpoints["pkl"], tmp_path / "converted", config=tiny_config, progress=False)
    assert parity.main([str(engine_dir)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("PASS")
