"""GPT-2's byte-level BPE tokenizer on tiktoken: offline from the shipped vocabulary or a checkpoint's files.

User text is always encoded as plain text: a literal `<|endoftext|>` typed by a user becomes ordinary
tokens, never the end-of-turn id 50256. `StreamDecoder` turns tokens into text one at a time without
splitting multi-byte UTF-8 characters.
"""

from __future__ import annotations

import codecs
import functools
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

VOCAB_DIR = Path(__file__).parent / "vocab"
ENDOFTEXT = "<|endoftext|>"
# The GPT-2 / r50k_base split pattern, as in tiktoken_ext/openai_public.py.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_SHIPPED_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


class TokenizerError(ValueError):
    """Tokenizer files that cannot be read, or token ids outside the vocabulary."""


def _bytes_to_unicode() -> dict[str, int]:
    """The printable-character alias GPT-2's vocab.json / merges.txt use for each byte (char -> byte)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    extra = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(extra)})
    return table


def _read_vocab(vocab_json: Path) -> dict[str, int]:
    try:
        vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"vocabulary file not found: {vocab_json}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{vocab_json}: not valid JSON ({e})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError(f"{vocab_json}: expected a JSON object mapping tokens to integer ids")
    return vocab


def _read_merges(merges_txt: Path) -> list[tuple[str, str]]:
    try:
        lines = merges_txt.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TokenizerError(f"merges file not found: {merges_txt}") from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{merges_txt}: not UTF-8 text ({e})") from None
    merges = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{merges_txt}, line {lineno}: expected two tokens separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _ranks_from_files(vocab: dict[str, int], merges: list[tuple[str, str]], vocab_json: Path,
                      merges_txt: Path) -> dict[bytes, int]:
    """tiktoken's mergeable ranks from GPT-2-style files; ids must follow merge order, as in GPT-2."""
    alias = _bytes_to_unicode()

    def to_bytes(token: str, where: Path) -> bytes:
        try:
            return bytes(alias[ch] for ch in token)
        except KeyError as e:
            raise TokenizerError(f"{where}: token {token!r} has character {e.args[0]!r} outside GPT-2's byte alphabet") from None

    ranks = {bytes([b]): i for i, b in enumerate(alias.values())}
    for first, second in merges:
        ranks[to_bytes(first, merges_txt) + to_bytes(second, merges_txt)] = len(ranks)
    from_vocab = {to_bytes(tok, vocab_json): i for tok, i in vocab.items() if tok != ENDOFTEXT}
    if from_vocab != ranks:
        differing = sorted(set(from_vocab.items()) ^ set(ranks.items()), key=lambda kv: kv[1])[:3]
        raise TokenizerError(
            f"{vocab_json} and {merges_txt} disagree: token ids must be the 256 bytes then one id per merge, "
            f"in order (first differences: {differing})"
        )
    return ranks


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes: comparing them spares parsing both (a few MB that stay resident)."""
    try:
        return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()
    except OSError:
        return False


class StreamDecoder:
    """Decodes a token stream piece by piece; bytes of a character split across tokens wait for the rest."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token (may be empty while a character is incomplete)."""
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id], self._skip_special_tokens))

    def flush(self) -> str:
        """Whatever is still buffered (an incomplete character becomes U+FFFD); the decoder is reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class Tokenizer:
    """GPT-2 byte-level BPE with `<|endoftext|>` (the end-of-turn / end-of-text token) as its one special token."""

    def __init__(self, encoding: tiktoken.Encoding, eos_token_id: int, vocab_json: Path, merges_txt: Path) -> None:
        self._encoding = encoding
        self.eos_token_id = eos_token_id
        self._files = (vocab_json, merges_txt)

    @classmethod
    def default(cls) -> Tokenizer:
        """The GPT-2 / DialoGPT tokenizer from the vocabulary shipped with this package (no network)."""
        return _default_tokenizer()

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> Tokenizer:
        """A tokenizer from a checkpoint's vocab.json + merges.txt (the shipped encoding when they hold the same)."""
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        default = cls.default()
        if all(_same_bytes(mine, shipped) for mine, shipped in zip((vocab_json, merges_txt), default._files)):
            return cls(default._encoding, default.eos_token_id, vocab_json, merges_txt)  # a converted model's copies
        vocab, merges = _read_vocab(vocab_json), _read_merges(merges_txt)
        if vocab == _read_vocab(default._files[0]) and merges == _read_merges(default._files[1]):
            return cls(default._encoding, default.eos_token_id, vocab_json, merges_txt)
        if ENDOFTEXT not in vocab:
            raise TokenizerError(f"{vocab_json}: no {ENDOFTEXT!r} entry (the end-of-text token)")
        ranks = _ranks_from_files(vocab, merges, vocab_json, merges_txt)
        encoding = tiktoken.Encoding(
            name=f"gpt2-bpe:{vocab_json.parent}",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: vocab[ENDOFTEXT]},
        )
        return cls(encoding, vocab[ENDOFTEXT], vocab_json, merges_txt)

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special-token strings in it are ordinary text."""
        return self._encoding.encode_ordinary(text)

    def _check_ids(self, ids: list[int]) -> None:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """The raw bytes of ids; a token may end in the middle of a UTF-8 character."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i != self.eos_token_id]
        return self._encoding.decode_bytes(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ids; invalid UTF-8 becomes U+FFFD, as in the reference tokenizer."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A decoder for streaming replies token by token."""
        return StreamDecoder(self, skip_special_tokens)

    def save(self, directory: str | Path) -> None:
        """Write vocab.json and merges.txt (copies of the files this tokenizer was built from) into directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for src, name in zip(self._files, ("vocab.json", "merges.txt")):
            if not (directory / name).exists() or not (directory / name).samefile(src):
                shutil.copyfile(src, directory / name)


def tokenizer_for(checkpoint: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint: a directory's vocab.json + merges.txt if it has both, else the default."""
    checkpoint = Path(checkpoint)
    vocab_json, merges_txt = checkpoint / "vocab.json", checkpoint / "merges.txt"
    if checkpoint.is_dir() and vocab_json.is_file() and merges_txt.is_file():
        return Tokenizer.from_files(vocab_json, merges_txt)
    return Tokenizer.default()


@functools.cache
def _default_tokenizer() -> Tokenizer:
    ranks = load_tiktoken_bpe(str(VOCAB_DIR / "gpt2.tiktoken"), expected_hash=_SHIPPED_TIKTOKEN_SHA256)
    encoding = tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )
    return Tokenizer(encoding, 50256, VOCAB_DIR / "vocab.json", VOCAB_DIR / "merges.txt")
