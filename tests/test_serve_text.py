"""A served choice's text (`gpt2.serve.text.ChoiceText`): decoded as tokens come, cut before the first stop string,
and never showing the start of a stop string that the next token may complete."""

from __future__ import annotations

import pytest

from gpt2.serve.text import ChoiceText
from gpt2.tokenizer import Tokenizer

TOKENIZER = Tokenizer.default()


def pieces(text: str) -> list[int]:
    return TOKENIZER.encode(text)


def stream(text: str, stops: list[str]) -> tuple[list[str], str, bool]:
    """(the text released at each token, the text released at the end, whether a stop string was met)."""
    choice = ChoiceText(TOKENIZER, stops)
    released = []
    for token in pieces(text):
        released.append(choice.push(token))
        if choice.stopped:
            break
    return released, choice.finish(), choice.stopped


@pytest.mark.parametrize("text, stops, expected", [
    ("Hello there, how are you?", [], "Hello there, how are you?"),
    ("Hello there, how are you?", [" how"], "Hello there,"),
    ("Hello there, how are you?", ["nothing", "are"], "Hello there, how "),
    ("Hello there, how are you?", ["ere, h"], "Hello th"),  # across tokens
    ("Hello there", ["there, how"], "Hello there"),  # the text ends in a stop string's start: released at the end
])
def test_text_is_cut_before_the_first_stop_string(text, stops, expected):
    released, tail, stopped = stream(text, stops)
    assert "".join(released) + tail == expected
    assert stopped == any(s in text for s in stops)


def test_a_possible_stop_string_start_is_held_back_until_the_next_token_tells():
    released, _, _ = stream("Hello there, how are you?", ["there, who"])
    shown = ""
    for piece in released:
        shown += piece
        assert not shown.endswith((" there", " there,")), shown  # could have been the stop string's start
    assert "".join(released) == "Hello there, how are you?"


def test_a_character_split_across_tokens_waits_for_its_last_byte():
    choice = ChoiceText(TOKENIZER, [])
    ids = TOKENIZER.encode("日本")
    parts = [choice.push(token) for token in ids] + [choice.finish()]
    assert "".join(parts) == "日本" and all("\ufffd" not in part for part in parts)
