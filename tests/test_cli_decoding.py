"""`gpt2 generate` and `gpt2 chat` with the decoding options: stop strings, beams, several sequences, a draft model."""

from __future__ import annotations

from pathlib import Path

import pytest

import gpt2
from gpt2.cli import _stop_text, main
from tests.checkpoints import make_reference_model, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = gpt2.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-decoding")
    source = save_checkpoint(make_reference_model(TINY, seed=5), root / "hf", "hf-safetensors")
    return gpt2.convert(source, root / "engine", progress=False)


@pytest.fixture(scope="module")
def model(model_dir):
    return gpt2.load(model_dir)


def test_generate_stops_at_a_stop_string_read_with_escapes(model_dir, model, capsys):
    prompt = model.tokenizer.encode("Hello there")
    free = model.generate([prompt], max_new_tokens=12, eos_token_id=None)[0]
    text = model.tokenizer.decode(free)
    stop = text[3:5]
    assert main(["generate", str(model_dir), "Hello there", "--greedy", "--max-new-tokens", "12",
                 "--stop", stop.replace("\n", "\\n").replace("\t", "\\t")]) == 0
    expected = model.generate([prompt], max_new_tokens=12, stop_strings=[stop])[0]
    assert capsys.readouterr().out == model.tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    assert stop in model.tokenizer.decode(expected) and len(expected) < len(free)


def test_stop_flag_reads_backslash_escapes():
    assert _stop_text("a\\nb\\tc\\\\n") == "a\nb\tc\\n"
