"""n-best sampling (`num_return_sequences` with `do_sample`): each prompt is prefilled once and its k rows continue
copies of that cache, giving what k separate prefills give, on every decode path; MMI candidates and reverse scores
batched the same way."""

from __future__ import annotations

import pytest
import torch

import gpt2.chat
import gpt2.decoding
import gpt2.mmi
from gpt2 import Chat, GPT2Config
from gpt2.kv_cache import KVCache
from tests.checkpoints import engine_twin, make_reference_model
from tests.decode_paths import PATHS, use_path

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=96)
PROMPTS = [[464, 3290, 318, 257, 1310], [40], [15496, 11, 703]]


@pytest.fixture(scope="module")
def model():
    return engine_twin(make_reference_model(CONFIG, seed=4))


@pytest.fixture
def prefills(monkeypatch) -> list[list[list[int]]]:
    """The rows of each prefill that generate runs."""
    seen = []
    real = gpt2.decoding.prefill

    def spy(model, cache, rows):
        seen.append([list(r) for r in rows])
        return real(model, cache, rows)

    monkeypatch.setattr(gpt2.decoding, "prefill", spy)
    return seen


@pytest.mark.parametrize("path", PATHS)
def test_n_samples_share_one_prefill_and_equal_separate_prefills(model, path, monkeypatch, prefills):
    """One random stream draws for the batch in row order, so k shared rows and the same k prompts given as separate
    rows draw the same tokens when their logits agree, which they do in fp32."""
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=40, temperature=0.9, seed=11, eos_token_id=None)
    separate = model.generate([p for p in PROMPTS for _ in range(4)], **kwargs)
    steps = use_path(path, monkeypatch)
    prefills.clear()
    shared = model.generate(PROMPTS, num_return_sequences=4, **kwargs)
    assert shared == separate
    assert prefills == [PROMPTS]  # one prefill, of each prompt once
    assert steps[path] == kwargs["max_new_tokens"] - 1
    assert len({tuple(s) for s in shared[:4]}) > 1  # samples, not copies


def test_n_best_return_dict_scores_each_sample(model):
    out = model.generate(PROMPTS[:2], num_return_sequences=3, do_sample=True, max_new_tokens=6, seed=2,
                         return_dict=True)
    assert len(out.sequences) == len(out.logprobs) == len(out.scores) == 6
    for seq, logprobs, score in zip(out.sequences, out.logprobs, out.scores):
        assert len(logprobs) == len(seq) and score == pytest.approx(sum(logprobs)) and score < 0


def test_greedy_with_several_sequences_is_refused(model):
    with pytest.raises(ValueError, match="num_return_sequences=2 needs do_sample=True"):
        model.generate(PROMPTS, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences=0 must be a positive integer"):
        model.generate(PROMPTS, num_return_sequences=0, do_sample=True)


def test_take_rows_copies_each_source_row_with_its_length(model):
    source = model.new_cache(2, 8)
    model(torch.tensor([[1, 2, 3], [4, 5, 0]]), cache=source, n_new=[3, 2])
    cache = KVCache(model.config, 3, 20, "cpu", torch.float32)
    cache.take_rows(source, [1, 0, 1])
    assert cache.lengths == [2, 3, 2]
    assert torch.equal(cache.k[:, 0, :, :3], source.k[:, 1, :, :3]) and torch.equal(cache.v[:, 1, :, :3],
                                                                                      source.v[:, 0, :, :3])
    model(torch.tensor([[7], [8], [9]]), cache=cache)  # appending to the copies leaves the source alone
    assert source.lengths == [3, 2] and cache.lengths == [3, 4, 3]
    assert source.k[:, 1, :, 2].abs().sum() == 0


def test_mmi_chats_score_their_candidates_in_one_reverse_forward(model, monkeypatch):
    """Two MMI chats sharing a reverse model: one `score` call for all their candidates, and the picks of each chat
    alone."""
    reverse = engine_twin(make_reference_model(CONFIG, seed=5))

    def chats() -> list[Chat]:
        return [Chat(model, reverse_model=reverse, n_candidates=3, max_new_tokens=6, seed=s) for s in (1, 2)]

    alone = [chat.say(text) for chat, text in zip(chats(), ["Hello there", "How are you?"])]
    calls = []
    real = gpt2.mmi.score

    def spy(model, contexts, continuations):
        calls.append(len(contexts))
        return real(model, contexts, continuations)

    monkeypatch.setattr(gpt2.mmi, "score", spy)
    assert Chat.say_many(chats(), ["Hello there", "How are you?"]) == alone
    assert calls == [6]
