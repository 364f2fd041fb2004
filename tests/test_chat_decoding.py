"""Chat with the decoding options of `generate`: beam-search replies, n-best sampling, a draft model."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import gpt2.chat
from gpt2 import Chat, GPT2Config
from gpt2.cpu.int8_linear import quantize_int8
from tests.checkpoints import engine_twin, make_reference_model

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128)
MESSAGES = ["Hello there!", "Does money buy happiness?", "What is the best way to buy happiness ?", "ok"]


@pytest.fixture(scope="module")
def model():
    return engine_twin(make_reference_model(CONFIG, seed=6))


def from_scratch(model, chat: Chat, **kwargs) -> list[int]:
    """The reply generate gives to the chat's history so far (its newest turn the message just answered)."""
    params = dataclasses.asdict(dataclasses.replace(chat.params, seed=None))
    return model.generate([gpt2.chat.format_history(chat.turns[:-1], chat.eos_token_id)], **params, **kwargs)[0]


def without_eos(reply: list[int]) -> list[int]:
    return reply[:-1] if reply and reply[-1] == 50256 else reply


def test_beam_replies_equal_generates_beams_turn_after_turn(model):
    settings = dict(num_beams=3, length_penalty=0.8)
    chat = Chat(model, do_sample=False, max_new_tokens=8, **settings)
    pieces: list[str] = []
    for text in MESSAGES:
        reply = chat.say(text, on_text=pieces.append)
        assert chat.turns[-1] == without_eos(from_scratch(model, chat, **settings))
        assert "".join(pieces) == reply
        pieces.clear()
    assert chat._cached == chat.context_ids()[:len(chat._cached)]  # the kept cache is the context, the reply re-read


def test_beam_chats_step_together_as_they_would_alone(model):
    def chats() -> list[Chat]:
        return [Chat(model, do_sample=False, max_new_tokens=6, num_beams=2) for _ in range(2)]

    alone = [chat.say(text) for chat, text in zip(chats(), MESSAGES)]
    assert Chat.say_many(chats(), MESSAGES[:2]) == alone


def test_n_best_keeps_the_candidate_of_the_best_mean_log_probability(model, monkeypatch):
    results = []
    real = gpt2.chat.continue_from_cache

    def spy(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(gpt2.chat, "continue_from_cache", spy)
    chat = Chat(model, max_new_tokens=8, num_return_sequences=4, seed=3)
    for text in MESSAGES[:2]:
        chat.say(text)
        out = results[-1]
        assert len(out.sequences) == 4 and len({tuple(s) for s in out.sequences}) > 1
        best = max(range(4), key=lambda r: sum(out.logprobs[r]) / len(out.logprobs[r]))
        assert chat.turns[-1] == without_eos(out.sequences[best])


def test_a_drafted_chat_replies_as_the_model_alone(model):
    draft = quantize_int8(copy.deepcopy(model))
    for sampling in (dict(do_sample=False), dict(do_sample=False, no_repeat_ngram_size=3, min_new_tokens=2)):
        plain, drafted = (Chat(model, max_new_tokens=10, draft_model=d, **sampling) for d in (None, draft))
        assert [drafted.say(text) for text in MESSAGES] == [plain.say(text) for text in MESSAGES]
    sampled = [Chat(model, max_new_tokens=10, draft_model=draft, seed=5) for _ in range(2)]
    assert [sampled[0].say(t) for t in MESSAGES[:2]] == [sampled[1].say(t) for t in MESSAGES[:2]]  # reproducible


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=2), "num_beams=2 with do_sample=True"),
    (dict(num_beams=2, do_sample=False, num_return_sequences=2), "a chat keeps one reply"),
    (dict(num_return_sequences=2, do_sample=False), "num_return_sequences=2 needs do_sample=True"),
    (dict(num_beams=2, do_sample=False, stop_strings=["\n"]), "stop_strings with num_beams=2"),
])
def test_bad_chat_decoding_settings_are_refused_by_name(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Chat(model, **kwargs)
    with pytest.raises(ValueError, match="its candidates are n_candidates"):
        Chat(model, reverse_model=model, num_return_sequences=2)
