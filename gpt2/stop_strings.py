"""Stop strings: a row stops once the text it has generated contains one of them.

Each row's tokens are decoded as they come (a character split across tokens waits for the rest), and only the text
that can hold a new occurrence is searched: the new piece and the len(longest stop string) - 1 characters before it.
So a stop string may span tokens, and checking a token costs the same however long the row has grown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import StreamDecoder, Tokenizer


def check_stop_strings(stop_strings: str | Sequence[str] | None) -> list[str]:
    """stop_strings as a list (a single string is one stop string), checked: non-empty strings only."""
    if stop_strings is None:
        return []
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if not isinstance(stop_strings, Sequence) or not all(isinstance(s, str) for s in stop_strings):
        raise ValueError(f"stop_strings={stop_strings!r} must be a string or a list of strings")
    if any(not s for s in stop_strings):
        raise ValueError("stop_strings holds an empty string, which every text contains: give non-empty strings")
    return list(stop_strings)


class StopStrings:
    """Watches the text of each row of a generation for any of `strings`."""

    def __init__(self, tokenizer: Tokenizer, strings: Sequence[str], rows: int) -> None:
        self.strings = list(strings)
        self.keep = max(len(s) for s in self.strings) - 1  # characters of old text a new occurrence can start in
        self.decoders: list[StreamDecoder] = [tokenizer.stream_decoder(skip_special_tokens=False) for _ in range(rows)]
        self.tails = [""] * rows

    def push(self, row: int, token: int) -> bool:
        """Add token to row's text; True once the text holds a stop string (the token that completes it included)."""
        window = self.tails[row] + self.decoders[row].push(token)
        self.tails[row] = window[len(window) - self.keep:] if self.keep else ""
        return any(s in window for s in self.strings)
