"""`gpt2 generate` and `gpt2 chat` with the decoding options: stop strings, beams, several sequences, a draft model."""

from __future__ import annotations

import io
import re
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


def test_generate_prints_the_best_beams_with_their_scores(model_dir, model, capsys):
    prompt = model.tokenizer.encode("Hello there")
    assert main(["generate", str(model_dir), "Hello there", "--num-beams", "3", "--num-return-sequences", "2",
                 "--max-new-tokens", "6", "--length-penalty", "0.5", "--early-stopping", "never"]) == 0
    out = model.generate([prompt], max_new_tokens=6, num_beams=3, num_return_sequences=2, length_penalty=0.5,
                         early_stopping="never", return_dict=True)
    expected = "".join(f"--- {i + 1} of 2, score {score:.3f}\n{model.tokenizer.decode(seq, skip_special_tokens=True)}\n"
                       for i, (seq, score) in enumerate(zip(out.sequences, out.scores)))
    assert capsys.readouterr().out == expected


def test_generate_samples_several_sequences(model_dir, model, capsys):
    assert main(["generate", str(model_dir), "Hello there", "--sample", "--seed", "4", "--num-return-sequences", "3",
                 "--max-new-tokens", "5"]) == 0
    out = model.generate([model.tokenizer.encode("Hello there")], max_new_tokens=5, do_sample=True, seed=4,
                         num_return_sequences=3)
    printed = capsys.readouterr().out.split("\n")
    assert [printed[i] for i in (1, 3, 5)] == [model.tokenizer.decode(s, skip_special_tokens=True) for s in out]


def test_generate_with_a_draft_prints_the_models_own_output(model_dir, model, capsys):
    assert main(["generate", str(model_dir), "Hello there", "--max-new-tokens", "12", "--draft", str(model_dir),
                 "--draft-quantize", "int8"]) == 0
    expected = model.generate([model.tokenizer.encode("Hello there")], max_new_tokens=12)[0]
    assert capsys.readouterr().out == model.tokenizer.decode(expected, skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("flags, settings", [
    (["--num-beams", "2"], dict(do_sample=False, num_beams=2)),  # beams imply greedy in chat, which samples otherwise
    (["--greedy", "--draft", "DRAFT"], dict(do_sample=False)),
    (["--num-return-sequences", "3", "--seed", "2"], dict(num_return_sequences=3, seed=2)),
])
def test_chat_replies_with_the_decoding_flags(model_dir, model, monkeypatch, capsys, flags, settings):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nHow are you?\n"))
    flags = [str(model_dir) if f == "DRAFT" else f for f in flags]
    assert main(["chat", str(model_dir), "--max-new-tokens", "6", *flags]) == 0
    chat = gpt2.Chat(model, max_new_tokens=6, **settings)
    expected = [chat.say(text).replace("\n", " ") for text in ("Hello there", "How are you?")]
    assert capsys.readouterr().out.split("\n") == [*expected, ""]


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_help_says_what_each_decoding_flag_does(command, capsys):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split()).split("options:", 1)[1]  # past the usage line
    for flag, says in (("--num-beams", "beam search"), ("--num-return-sequences", "sampled" if command == "chat"
                                                                                  else "samples"),
                       ("--stop", "end a reply"), ("--draft", "speculative decoding"), ("--length-penalty", "beam")):
        entry = re.search(re.escape(flag) + r" [A-Z_{][^ ]* (.{0,300})", text)  # "--flag METAVAR what it does"
        assert entry and says in entry.group(1), flag


def test_bad_decoding_flags_are_errors_naming_them(model_dir, capsys):
    assert main(["generate", str(model_dir), "hi", "--num-beams", "2", "--num-return-sequences", "3"]) == 2
    assert "num_return_sequences=3 exceeds num_beams=2" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "hi", "--num-beams", "2", "--sample"]) == 2
    assert "num_beams=2 with do_sample=True" in capsys.readouterr().err
