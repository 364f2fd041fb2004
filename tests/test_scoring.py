"""`model.score` against the transformers reference, and MMI reranking with a reverse model of known preference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gpt2.scoring
from gpt2 import GPT2, GPT2Config, MMIReranker
from gpt2.mmi import check_same_vocabulary
from tests.checkpoints import engine_twin, make_reference_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, GPT2]:
    reference = make_reference_model(TINY, seed=3)
    return reference, engine_twin(reference)


def random_ids(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (n,), generator=g).tolist() for n in lengths]


CONTEXTS = random_ids([1, 7, 20, 3, 40], seed=1)
CONTINUATIONS = random_ids([5, 1, 12, 9, 30], seed=2)


@torch.inference_mode()
def reference_logprob(reference: torch.nn.Module, context: list[int], continuation: list[int]) -> float:
    logprobs = reference(torch.tensor([context + continuation])).logits[0].double().log_softmax(-1)  # (T, V)
    return sum(logprobs[len(context) - 1 + j, token].item() for j, token in enumerate(continuation))


def test_score_matches_transformers_reference(pair):
    reference, model = pair
    scores = model.score(CONTEXTS, CONTINUATIONS)
    expected = [reference_logprob(reference, c, x) for c, x in zip(CONTEXTS, CONTINUATIONS)]
    assert len(scores) == len(expected)
    for got, want, cont in zip(scores, expected, CONTINUATIONS):
        assert abs(got - want) <= 1e-4 * len(cont), (got, want)


def test_ragged_batch_equals_pairs_alone_and_chunking_does_not_matter(pair, monkeypatch):
    _, model = pair
    batched = model.score(CONTEXTS, CONTINUATIONS)
    alone = [model.score([c], [x])[0] for c, x in zip(CONTEXTS, CONTINUATIONS)]
    assert batched == pytest.approx(alone, abs=1e-4)
    monkeypatch.setattr(gpt2.scoring, "PROJECT_CHUNK", 3)  # many small projections, split across pairs
    assert model.score(CONTEXTS, CONTINUATIONS) == pytest.approx(batched, abs=1e-5)


def test_one_forward_for_the_whole_batch(pair, monkeypatch):
    _, model = pair
    calls = []
    forward = GPT2.forward
    monkeypatch.setattr(GPT2, "forward", lambda self, ids, *a, **k: calls.append(ids.shape) or forward(self, ids, *a, **k))
    model.score(CONTEXTS, CONTINUATIONS)
    assert calls == [(5, 70)]


def test_empty_continuation_scores_zero_and_single_tokens_are_log_softmax(pair):
    reference, model = pair
    context = CONTEXTS[2]
    scores = model.score([context, context, context], [[], [11], [50256]])
    assert scores[0] == 0.0
    logprobs = reference(torch.tensor([context])).logits[0, -1].double().log_softmax(-1)
    assert scores[1:] == pytest.approx([logprobs[11].item(), logprobs[50256].item()], abs=1e-4)


@pytest.mark.parametrize("contexts, continuations, message", [
    ([[1]], [[2], [3]], "1 contexts but 2 continuations"),
    ([[]], [[2]], "context 0 is empty"),
    ([[1]], [[50257]], "continuation 0: token id 50257"),
    ([[1], "hello"], [[2], [3]], "context 1 must be a list of token ids"),
    ([[1] * 100], [[2] * 29], "pair 0: context 100 \\+ continuation 29 tokens exceed"),
])
def test_bad_inputs_are_named(pair, contexts, continuations, message):
    _, model = pair
    with pytest.raises(ValueError, match=message):
        model.score(contexts, continuations)


# --- MMI -------------------------------------------------------------------------------------------

REVERSE = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=32, vocab_size=64, bos_token_id=63, eos_token_id=63)
EOS = REVERSE.eos_token_id
REPLIES = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
SOURCES = [[40, 41, 42], [50, 51, 52], [55, 56, 57]]  # SOURCES[i] is what reply i answers


@pytest.fixture(scope="module")
def reverse_model() -> GPT2:
    """A reverse model trained to read `reply_i <eos> source_i <eos>`: it knows which source each reply answers."""
    torch.manual_seed(0)
    model = GPT2(REVERSE)
    rows = [r + [EOS] + s + [EOS] for r, s in zip(REPLIES, SOURCES)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # (3, T)
    targets = torch.full_like(ids, -100)
    for i, (reply, source) in enumerate(zip(REPLIES, SOURCES)):  # learn only P(source | reply)
        start = len(reply) + 1  # the source follows the reply and its eos
        targets[i, start:start + len(source) + 1] = torch.tensor(source + [EOS])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        logits = model(ids)[:, :-1]  # (3, T-1, V)
        loss = F.cross_entropy(logits.reshape(-1, REVERSE.vocab_size), targets[:, 1:].reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_mmi_picks_the_candidate_the_reverse_model_prefers(reverse_model):
    reranker = MMIReranker(reverse_model)
    for i, source in enumerate(SOURCES):
        history = [[1, 2, 3], source]  # the source is the newest turn, the message being answered
        best, scores = reranker.rerank(history, REPLIES)
        assert best == i, scores
        assert scores[i] > max(s for j, s in enumerate(scores) if j != i) + 5
    # a candidate's trailing eos (how generation ends a reply) does not change its score
    with_eos = [r + [EOS] for r in REPLIES]
    assert reranker.scores([SOURCES[1]], with_eos) == pytest.approx(reranker.scores([SOURCES[1]], REPLIES))


def test_mmi_source_is_newest_turns_first(reverse_model):
    reranker = MMIReranker(reverse_model, source_turns=2)
    assert reranker.source([[1], [2, 3], [4]]) == [4, EOS, 2, 3, EOS]
    expected = reverse_model.score([REPLIES[0] + [EOS]], [[4, EOS, 2, 3, EOS]])
    assert reranker.scores([[1], [2, 3], [4]], [REPLIES[0]]) == pytest.approx(expected)


def test_mmi_temperature_samples_by_softmax_of_scores(reverse_model):
    scores = [-5.0, -1.0, -3.0]
    assert MMIReranker(reverse_model).pick(scores) == 1
    assert {MMIReranker(reverse_model, temperature=1e-3).pick(scores, torch.Generator().manual_seed(s))
            for s in range(20)} == {1}
    flat = {MMIReranker(reverse_model, temperature=1e6).pick(scores, torch.Generator().manual_seed(s))
            for s in range(40)}
    assert flat == {0, 1, 2}


def test_mmi_needs_a_shared_vocabulary(reverse_model, pair):
    _, forward = pair
    with pytest.raises(ValueError, match="vocabulary"):
        check_same_vocabulary(forward, reverse_model)
    with pytest.raises(ValueError, match="temperature"):
        MMIReranker(reverse_model, temperature=-1.0)
    with pytest.raises(ValueError, match="at least one history turn"):
        MMIReranker(reverse_model).scores([], REPLIES)
