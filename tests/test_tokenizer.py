"""The tiktoken-based tokenizer against transformers' GPT2Tokenizer on the same vocabulary files."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import transformers

from gpt2.tokenizer import VOCAB_DIR, Tokenizer, TokenizerError, tokenizer_for

TEXTS = [
    "Hello, how are you doing today?",
    "I'm fine. You'll see; they've gone, we'd done it, she's here, don't. I'M LOUD 'S 'll",
    "  leading spaces and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand   runs  of    whitespace \n \t ",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x != 0x1F: pass\n",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский текст, עברית, العربية",
    "中文文本和日本語のテキスト、한국어 텍스트",
    "emoji 😀👍🏽 🇺🇸 family 👨‍👩‍👧‍👦 and combining e\u0301 a\u0308",
    "numbers 1234567890 3.14159 1e-5 -42 1,000,000",
    "<|endoftext|>",
    "hi<|endoftext|>there <|endoftext|> <|endoftext|><|endoftext|>",
    "",
    " ",
    "\n",
    "a" * 300 + " " + "ab" * 100,
]


def _random_texts(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pools = [" \t\n", "abcXYZ'sdmtllvere", "0123456789", "!?.,;:-_()[]{}<>|\"'", "éßøπжд中文😀🏽\u0301"]
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randrange(1, 80))) for _ in range(n)]


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.GPT2Tokenizer.from_pretrained(VOCAB_DIR, split_special_tokens=True)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def test_basic_properties(tok):
    assert tok.eos_token_id == 50256
    assert tok.vocab_size == 50257
    assert tok.decode([50256]) == "<|endoftext|>"
    assert tok.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("text", TEXTS + _random_texts())
def test_encode_decode_match_reference(tok, hf_tokenizer, text):
    ids = tok.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert tok.decode(ids) == hf_tokenizer.decode(ids) == text


def test_literal_endoftext_is_plain_text(tok):
    ids = tok.encode("a <|endoftext|> b<|endoftext|>")
    assert 50256 not in ids
    assert tok.decode(ids) == "a <|endoftext|> b<|endoftext|>"


def test_decode_skips_special_tokens(tok):
    ids = tok.encode("Hi there") + [50256] + tok.encode(" again") + [50256]
    assert tok.decode(ids) == "Hi there<|endoftext|> again<|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hi there again"


def test_decode_invalid_utf8_like_reference(tok, hf_tokenizer):
    ids = tok.encode("😀")[:1] + tok.encode("ok")  # first byte-piece of the emoji only
    assert tok.decode(ids) == hf_tokenizer.decode(ids)
    assert "\ufffd" in tok.decode(ids)


@pytest.mark.parametrize("text", ["emoji 😀👍🏽 and 中文 and e\u0301", "🇺🇸👨‍👩‍👧‍👦"])
def test_stream_decoder_never_splits_characters(tok, text):
    ids = tok.encode(text) + [50256]
    assert any(not _is_utf8(tok.decode_bytes([i])) for i in ids)  # some character spans several tokens
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text  # the end-of-text token is skipped by default


def test_stream_decoder_flushes_incomplete_character(tok):
    stream = tok.stream_decoder()
    first_piece = tok.encode("😀")[0]
    assert stream.push(first_piece) == ""
    assert stream.flush() == "\ufffd"
    assert stream.push(tok.encode("ok")[0]) == "ok"  # reset after flush


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_decode_rejects_ids_outside_vocabulary(tok):
    with pytest.raises(TokenizerError, match="50257"):
        tok.decode([1, 50257])
    with pytest.raises(TokenizerError, match="-1"):
        tok.decode([-1])


def test_from_files_reserialised_vocab_is_the_shipped_encoding(tok, tmp_path):
    vocab = json.loads((VOCAB_DIR / "vocab.json").read_text(encoding="utf-8"))
    (tmp_path / "vocab.json").write_text(json.dumps(dict(reversed(vocab.items())), indent=1), encoding="utf-8")
    shutil.copyfile(VOCAB_DIR / "merges.txt", tmp_path / "merges.txt")
    other = Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    text = TEXTS[5] + TEXTS[4]
    assert other.encode(text) == tok.encode(text)
    assert tokenizer_for(tmp_path).encode(text) == tok.encode(text)
    out = tmp_path / "saved"
    other.save(out)
    assert (out / "vocab.json").read_bytes() == (tmp_path / "vocab.json").read_bytes()  # source files, copied
    assert (out / "merges.txt").read_bytes() == (VOCAB_DIR / "merges.txt").read_bytes()


def _small_vocab(tmp_path, n_merges: int = 2000):
    """vocab.json + merges.txt of a smaller BPE: GPT-2's first n_merges merges."""
    lines = (VOCAB_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    vocab = json.loads((VOCAB_DIR / "vocab.json").read_text(encoding="utf-8"))
    small = {t: i for t, i in vocab.items() if i < 256 + n_merges}
    small["<|endoftext|>"] = 256 + n_merges
    (tmp_path / "vocab.json").write_text(json.dumps(small), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("\n".join(lines[: 1 + n_merges]) + "\n", encoding="utf-8")
    return small


def test_from_files_builds_other_vocabularies_like_reference(tmp_path):
    small = _small_vocab(tmp_path)
    tok = Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    hf = transformers.GPT2Tokenizer.from_pretrained(tmp_path, split_special_tokens=True)
    assert tok.eos_token_id == small["<|endoftext|>"] and tok.vocab_size == len(small)
    for text in TEXTS + _random_texts(10, seed=1):
        assert tok.encode(text) == hf.encode(text), text
        assert tok.decode(tok.encode(text)) == text


def test_save_default_writes_shipped_files(tok, tmp_path):
    tok.save(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (VOCAB_DIR / name).read_bytes()
    tokenizer_for(tmp_path).save(tmp_path)  # saving onto its own files is a no-op, not an error


def test_tokenizer_for_without_files_is_default(tmp_path, tok):
    assert tokenizer_for(tmp_path).encode("hello") == tok.encode("hello")
    assert tokenizer_for(tmp_path / "weights.pkl").encode("hello") == tok.encode("hello")


def test_bad_tokenizer_files(tmp_path):
    _small_vocab(tmp_path)
    with pytest.raises(TokenizerError, match="vocabulary file not found"):
        Tokenizer.from_files(tmp_path / "nope.json", tmp_path / "merges.txt")
    with pytest.raises(TokenizerError, match="merges file not found"):
        Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "nope.txt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json: not valid JSON"):
        Tokenizer.from_files(tmp_path / "bad.json", tmp_path / "merges.txt")
    (tmp_path / "short.txt").write_text("#version: 0.2\nĠ t\nh e\n")  # fewer merges than the vocab has
    with pytest.raises(TokenizerError, match="disagree"):
        Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "short.txt")
    (tmp_path / "odd.txt").write_text("#version: 0.2\nĠ t extra\n")
    with pytest.raises(TokenizerError, match="odd.txt, line 2"):
        Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "odd.txt")
