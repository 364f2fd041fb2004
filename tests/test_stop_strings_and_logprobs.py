"""`generate(..., stop_strings=..., return_dict=True)`: stop strings checked on each row's decoded text, and each token's
log-probability against transformers' logits.

Tolerance: log-probabilities within 1e-4 of transformers' (both fp32; the logits differ by accumulation-order
rounding, ~1e-6, as in tests/test_parity.py, and a log-softmax moves them by no more than twice that).
"""

from __future__ import annotations

import pytest
import torch

from gpt2 import Chat
from gpt2.stop_strings import StopStrings
from gpt2.tokenizer import Tokenizer
from tests.checkpoints import engine_twin, make_reference_model
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

LOGPROB_ATOL = 1e-4
PROMPTS = [[464, 3290, 318, 257], [40], [15496, 11, 703, 389, 345, 30]]


@pytest.fixture(scope="module")
def pair():
    reference = make_reference_model(TINY, seed=3)
    return reference, engine_twin(reference)


def first_hit(tokenizer: Tokenizer, tokens: list[int], stop: str) -> int | None:
    """The reference semantics: the length of the shortest prefix whose whole decoded text contains stop."""
    for j in range(len(tokens)):
        if stop in tokenizer.decode(tokens[:j + 1]):
            return j + 1
    return None


def spanning_stop(tokenizer: Tokenizer, tokens: list[int]) -> str:
    """Two characters of tokens' text, the last of one token and the first of the next."""
    text = tokenizer.decode(tokens)
    for j in range(2, len(tokens)):
        head = tokenizer.decode(tokens[:j])
        whole_characters = "\ufffd" not in text and text.startswith(head)
        if whole_characters and len(text) > len(head) and tokenizer.decode(tokens[j:j + 1]):
            return text[len(head) - 1:len(head) + 1]
    raise AssertionError("no token boundary to span")


def test_a_row_stops_at_the_token_completing_a_stop_string_that_spans_tokens(pair):
    _, model = pair
    tokenizer = model.tokenizer
    free = model.generate(PROMPTS, max_new_tokens=16, eos_token_id=None)
    for row in range(len(PROMPTS)):
        stop = spanning_stop(tokenizer, free[row])
        out = model.generate(PROMPTS, max_new_tokens=16, eos_token_id=None, stop_strings=[stop])
        for r, tokens in enumerate(free):  # every row stops on its own text, the others run on
            assert out[r] == tokens[:first_hit(tokenizer, tokens, stop) or len(tokens)], (r, stop)
        assert first_hit(tokenizer, free[row], stop) is not None


def test_stop_strings_inside_a_character_split_across_tokens():
    """An emoji is several byte tokens: the row stops at the token that completes the character, not before."""
    tokenizer = Tokenizer.default()
    tokens = tokenizer.encode("ok 😀 then")
    stops = StopStrings(tokenizer, ["😀"], rows=1)
    hits = [stops.push(0, t) for t in tokens]
    assert hits.index(True) + 1 == first_hit(tokenizer, tokens, "😀")
    assert len(tokenizer.encode(" 😀")) > 1  # the case this test is about


def test_return_dict_logprobs_match_transformers_logits(pair):
    reference, model = pair
    for kwargs in (dict(), dict(do_sample=True, top_k=20, temperature=0.7, seed=5),
                   dict(repetition_penalty=1.3, no_repeat_ngram_size=2)):
        out = model.generate(PROMPTS, max_new_tokens=8, eos_token_id=None, return_dict=True, **kwargs)
        assert out.sequences == model.generate(PROMPTS, max_new_tokens=8, eos_token_id=None, **kwargs)
        for prompt, seq, logprobs, score in zip(PROMPTS, out.sequences, out.logprobs, out.scores):
            with torch.no_grad():
                logits = reference(torch.tensor([prompt + seq])).logits[0, len(prompt) - 1:-1]  # (n, V)
            expected = logits.log_softmax(-1).gather(1, torch.tensor(seq)[:, None])[:, 0]
            assert len(logprobs) == len(seq)
            assert (torch.tensor(logprobs) - expected).abs().max().item() <= LOGPROB_ATOL, kwargs
            assert score == pytest.approx(sum(logprobs))


def test_chat_replies_end_at_a_stop_string(pair):
    _, model = pair
    free = Chat(model, do_sample=False, max_new_tokens=12, min_new_tokens=0)
    reply = free.say("Hello there")
    tokens = free.turns[-1]
    stop = model.tokenizer.decode(tokens[3:5])
    chat = Chat(model, do_sample=False, max_new_tokens=12, min_new_tokens=0, stop_strings=[stop])
    stopped = chat.say("Hello there")
    assert chat.turns[-1] == tokens[:first_hit(model.tokenizer, tokens, stop)] and stop in stopped
    assert reply.startswith(stopped)


@pytest.mark.parametrize("stop_strings", [[""], [1], 3])
def test_bad_stop_strings_are_refused_by_name(pair, stop_strings):
    _, model = pair
    with pytest.raises(ValueError, match="stop_strings"):
        model.generate(PROMPTS, max_new_tokens=2, stop_strings=stop_strings)


def test_stop_strings_need_a_tokenizer():
    model = engine_twin(make_reference_model(TINY, seed=3))
    del model.tokenizer
    with pytest.raises(ValueError, match="stop_strings needs the model's tokenizer"):
        model.generate(PROMPTS, max_new_tokens=2, stop_strings=["\n"])
