"""One choice's text as its tokens come: decoded incrementally, and cut before the first stop string.

While the end of the text could be the start of a stop string it is held back, so a streamed choice never shows
part of a stop string that the next token completes. A stop string may span tokens.
"""

from __future__ import annotations

from ..tokenizer import Tokenizer


class ChoiceText:
    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.stops = stops
        self.held = ""  # decoded, not yet released
        self.stopped = False

    def push(self, token: int) -> str:
        """Add token; the text released now. Sets `stopped` once the text holds a stop string."""
        return self._release(self.held + self.decoder.push(token))

    def finish(self) -> str:
        """The text still held at the end (up to a stop string)."""
        if self.stopped:
            return ""
        return self._release(self.held + self.decoder.flush(), final=True)

    def _release(self, text: str, final: bool = False) -> str:
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.held = True, ""
            return text[:cut]
        keep = 0 if final else self._stop_prefix_length(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def _stop_prefix_length(self, text: str) -> int:
        """The length of the longest end of text that begins some stop string."""
        for length in range(min(len(text), max((len(s) - 1 for s in self.stops), default=0)), 0, -1):
            if any(s.startswith(text[-length:]) for s in self.stops):
                return length
        return 0
