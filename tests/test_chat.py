"""Chat sessions: DialoGPT format, turn-aware truncation, KV cache reuse equal to from-scratch, batching, MMI."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import transformers

import gpt2.chat
from gpt2 import GPT2, Chat, ChatNotice, GPT2Config
from gpt2.chat import fit_history, format_history
from gpt2.tokenizer import VOCAB_DIR, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128)
EOS = 50256
MESSAGES = ["Hello there!", "Does money buy happiness?", "What is the best way to buy happiness ?",
            "This is so difficult !", "ok", "Tell me about your day, please, in some detail."]


def seeded_model(seed: int) -> GPT2:
    torch.manual_seed(seed)
    model = GPT2(CONFIG).eval()
    model.tokenizer = Tokenizer.default()
    return model


@pytest.fixture(scope="module")
def model() -> GPT2:
    return seeded_model(0)


@pytest.fixture
def prefills(monkeypatch) -> list[tuple[list[int], list[list[int]]]]:
    """Each prefill a chat step runs: (tokens each row held before it, the new tokens of each row)."""
    seen = []
    real = gpt2.chat.prefill

    def spy(model, cache, rows):
        seen.append((list(cache.lengths), [list(r) for r in rows]))
        return real(model, cache, rows)

    monkeypatch.setattr(gpt2.chat, "prefill", spy)
    return seen


def without_eos(reply: list[int]) -> list[int]:
    return reply[:-1] if reply and reply[-1] == EOS else reply


def from_scratch(model: GPT2, context: list[int], params, seed: int | None = None) -> list[int]:
    return model.generate([context], **dataclasses.asdict(dataclasses.replace(params, seed=seed)))[0]


def words(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    vocab = ["apple", "river", "stone", "light", "quiet", "table", "seven", "green", "cloud", "paper"]
    return " ".join(vocab[i] for i in torch.randint(0, len(vocab), (n,), generator=g).tolist())


def test_history_is_dialogpt_format_token_for_token(model):
    """Against the model card's loop: tokenizer.encode(text + eos_token) per user turn, generated ids appended."""
    hf = transformers.GPT2Tokenizer.from_pretrained(VOCAB_DIR)
    chat = Chat(model, do_sample=False, max_new_tokens=8)
    card_history: list[int] = []
    for text in MESSAGES[:3]:
        card_history += hf.encode(text + hf.eos_token)
        chat.say(text)
        card_history += chat.turns[-1] + [EOS]  # the reply and the eos that ends it
        assert chat.context_ids() == card_history
    assert format_history([[1, 2], [], [3]], EOS) == [1, 2, EOS, EOS, 3, EOS]


def test_cached_turns_prefill_only_new_tokens_and_equal_from_scratch(model, prefills):
    for sampling in ({"do_sample": False}, {}):  # greedy, then the sampled defaults with a seed
        chat = Chat(model, max_new_tokens=10, seed=7, **sampling)
        prefills.clear()
        held = 0
        for turn, text in enumerate(MESSAGES):
            context = chat.context_ids() + Tokenizer.default().encode(text) + [EOS]
            reply = chat.say(text)
            expected = from_scratch(model, context, chat.params, seed=7 + turn)
            assert chat.turns[-1] == without_eos(expected), f"turn {turn}, {sampling}"
            assert reply == model.tokenizer.decode(without_eos(expected))
            assert prefills[-1] == ([held], [context[held:]])  # only what the cache did not hold
            held = len(context) + len(expected) - 1  # the reply's last token is never fed back
        assert held > 0 and len(prefills) == len(MESSAGES)


def test_truncation_drops_oldest_whole_turns_and_reprefills(model, prefills):
    max_new = 16
    chat = Chat(model, do_sample=False, max_new_tokens=max_new, max_history_tokens=None)
    transcript: list[list[int]] = []
    drops = previous_start = 0
    for turn in range(8):
        text = words(12 + 5 * (turn % 3), seed=turn)
        transcript.append(Tokenizer.default().encode(text))
        chat.say(text)
        seen = chat.turns[:-1]  # the history the reply answered
        start = len(transcript) - len(seen)
        assert seen == transcript[start:], "kept turns must be a suffix of whole turns"
        context = format_history(seen, EOS)
        assert len(context) + max_new <= CONFIG.n_positions
        if start > 0:  # only as many turns dropped as needed
            assert len(format_history(transcript[start - 1:], EOS)) + max_new > CONFIG.n_positions
        held, new = prefills[-1]
        if start > previous_start:  # the prefix changed: everything prefilled again
            assert (held, new) == ([0], [context])
            drops += 1
        elif turn > 0:
            assert held[0] > 0 and new == [context[held[0]:]]
        previous_start = start
        expected = from_scratch(model, format_history(seen, EOS), chat.params)
        assert chat.turns[-1] == without_eos(expected)
        transcript.append(chat.turns[-1])
    assert drops >= 2


def test_history_caps(model):
    chat = Chat(model, do_sample=False, max_new_tokens=6, max_history_turns=3)
    for text in MESSAGES:
        chat.say(text)
        assert len(chat.turns) <= 3 + 1  # the reply on top of the capped history
    chat = Chat(model, do_sample=False, max_new_tokens=6, max_history_tokens=20)
    for text in MESSAGES:
        chat.say(text)
        history = chat.turns[:-1]
        assert len(history) == 1 or len(format_history(history, EOS)) <= 20


def test_fit_history():
    turns = [[1] * 5, [2] * 5, [3] * 5]
    assert fit_history(turns, budget=18) == (turns, 0)
    assert fit_history(turns, budget=13) == (turns[1:], 0)
    assert fit_history(turns, budget=11) == (turns[2:], 0)
    assert fit_history(turns, budget=18, max_turns=2) == (turns[1:], 0)
    assert fit_history(turns, budget=18, max_tokens=7) == (turns[2:], 0)
    assert fit_history(turns, budget=18, max_tokens=3) == (turns[2:], 0)  # the newest turn is never dropped
    long = list(range(20))
    assert fit_history([[9], long], budget=10) == ([long[11:]], 11)  # 9 tokens + eos fill the budget


def test_a_message_longer_than_the_context_is_cut_from_its_start_with_a_notice(model):
    chat = Chat(model, do_sample=False, max_new_tokens=16)
    text = words(150, seed=3)
    ids = Tokenizer.default().encode(text)
    with pytest.warns(ChatNotice, match=f"your message is {len(ids)} tokens"):
        chat.say(text)
    budget = CONFIG.n_positions - 16
    assert chat.turns[0] == ids[len(ids) - budget + 1:]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChatNotice)
        chat.say("short")  # fits: no notice; the cut turn is dropped whole
    assert len(chat.turns) == 3 and chat.turns[1] == Tokenizer.default().encode("short")  # reply, short, reply


def test_fifty_turn_conversation_stays_in_context(model, prefills):
    max_new = 8
    chat = Chat(model, max_new_tokens=max_new, seed=0)  # the chat defaults: sampling, n-gram bans, min length
    assert chat.params.do_sample and chat.params.min_new_tokens >= 1
    for turn in range(50):
        chat.say(words(1 + (turn * 7) % 40, seed=turn))
        held, new = prefills[-1]
        assert held[0] + len(new[0]) + max_new <= CONFIG.n_positions
        assert len(without_eos(chat.turns[-1])) >= chat.params.min_new_tokens  # never an empty reply
    assert len(chat.context_ids()) <= CONFIG.n_positions


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_input_gets_a_clear_message(model, text):
    chat = Chat(model, do_sample=False, max_new_tokens=4)
    chat.say("hi")
    turns = [list(t) for t in chat.turns]
    with pytest.raises(ValueError, match="empty message"):
        chat.say(text)
    assert chat.turns == turns


def test_literal_endoftext_typed_by_the_user_stays_text(model):
    chat = Chat(model, do_sample=False, max_new_tokens=4)
    text = "I typed <|endoftext|> here"
    chat.say(text)
    assert chat.turns[0] == Tokenizer.default().encode(text) and EOS not in chat.turns[0]
    assert chat.history[0] == text
    assert chat.context_ids().count(EOS) == len(chat.turns)  # eos only as the turn separator


def test_streaming_pieces_make_the_reply(model):
    chat = Chat(model, max_new_tokens=12, seed=1)
    for text in MESSAGES[:3]:
        pieces: list[str] = []
        reply = chat.say(text, on_text=pieces.append)
        assert "".join(pieces) == reply and len(pieces) > 1


def test_reset_forgets_everything(model):
    chat = Chat(model, max_new_tokens=8, seed=3)
    first = chat.say("hello")
    chat.say("more")
    chat.reset()
    assert chat.turns == [] and chat.context_ids() == []
    assert chat.say("hello") == first


def test_defaults_avoid_the_greedy_failure_modes_and_are_overridable(model):
    params = Chat(model).params
    assert params.do_sample and 0 < params.top_p < 1 and params.top_k > 0
    assert params.no_repeat_ngram_size > 0 or params.repetition_penalty > 1
    assert params.min_new_tokens >= 1
    greedy = Chat(model, do_sample=False, max_new_tokens=6)
    assert not greedy.params.do_sample and greedy.params.max_new_tokens == 6
    with pytest.raises(ValueError, match="unknown chat setting"):
        Chat(model, top_q=0.5)
    with pytest.raises(ValueError, match="top_p"):
        Chat(model, top_p=1.5)
    with pytest.raises(ValueError, match="no room for history"):
        Chat(model, max_new_tokens=127)
    bare = GPT2(CONFIG)
    with pytest.raises(ValueError, match="no tokenizer"):
        Chat(bare)


def test_chats_step_together_as_one_ragged_batch(model, prefills):
    openers = [["hi"], ["Does money buy happiness?", "yes"], []]
    batch = [Chat(model, do_sample=False, max_new_tokens=8) for _ in openers]
    alone = [Chat(model, do_sample=False, max_new_tokens=8) for _ in openers]
    for chat, twin, lines in zip(batch, alone, openers):
        for line in lines:
            chat.say(line)
            twin.say(line)
    for round_ in range(2):
        texts = [f"round {round_}", "This is so difficult !", words(9, seed=round_)]
        streamed = {i: "" for i in range(3)}

        def on_text(i: int, piece: str) -> None:
            streamed[i] += piece

        prefills.clear()
        replies = Chat.say_many(batch, texts, on_text)
        assert len(prefills) == 1 and len(prefills[0][1]) == 3  # one ragged prefill for all chats
        assert replies == [twin.say(text) for twin, text in zip(alone, texts)]
        assert [chat.turns for chat in batch] == [twin.turns for twin in alone]
        assert [streamed[i] for i in range(3)] == replies


def test_sampled_chats_reply_in_a_batch_as_they_would_alone(model):
    reverse = seeded_model(1)

    def chats() -> list[Chat]:  # sampling, each with its own seed; the last reranks 3 candidates by MMI
        return [Chat(model, max_new_tokens=8, seed=1), Chat(model, max_new_tokens=8, seed=2),
                Chat(model, max_new_tokens=8, seed=3, reverse_model=reverse, n_candidates=3)]

    batch, alone = chats(), chats()
    for round_ in range(3):
        texts = [f"round {round_}", "This is so difficult !", words(5, seed=round_)]
        replies = Chat.say_many(batch, texts)
        assert replies == [twin.say(text) for twin, text in zip(alone, texts)]
    assert len({tuple(chat.turns[-1]) for chat in batch}) == 3


def test_say_many_refuses_mismatched_chats(model):
    a, b = Chat(model, max_new_tokens=8), Chat(model, max_new_tokens=9)
    with pytest.raises(ValueError, match="different sampling settings"):
        Chat.say_many([a, b], ["x", "y"])
    with pytest.raises(ValueError, match="one message per chat"):
        Chat.say_many([a], ["x", "y"])
    with pytest.raises(ValueError, match="appears twice"):
        Chat.say_many([a, a], ["x", "y"])


def test_chat_with_mmi_keeps_the_best_scored_candidate(model, monkeypatch, prefills):
    reverse = seeded_model(1)
    picks = []
    real = gpt2.chat.rerank_together

    def spy(rerankers, histories, candidates, generators):
        results = real(rerankers, histories, candidates, generators)
        picks.extend((h, c, best, scores) for h, c, (best, scores) in zip(histories, candidates, results))
        return results

    monkeypatch.setattr(gpt2.chat, "rerank_together", spy)
    chat = Chat(model, reverse_model=reverse, n_candidates=5, max_new_tokens=8, seed=0)
    for text in MESSAGES[:3]:
        pieces: list[str] = []
        reply = chat.say(text, on_text=pieces.append)
        history, candidates, best, scores = picks[-1]
        assert len(candidates) == 5 and len({tuple(c) for c in candidates}) > 1  # sampled, not copies
        assert best == max(range(5), key=scores.__getitem__)
        source = history[-1] + [EOS]
        assert scores == pytest.approx(reverse.score([without_eos(c) + [EOS] for c in candidates], [source] * 5))
        assert chat.turns[-1] == without_eos(candidates[best]) and "".join(pieces) == reply
    # the turn is prefilled once on the kept cache; the 5 candidates continue from copies of it
    assert len(prefills[-1][1]) == 1 and prefills[-1][0][0] > 0
    with pytest.raises(ValueError, match="sampled candidates"):
        Chat(model, reverse_model=reverse, do_sample=False)


@pytest.mark.parametrize("greedy", [True, False])
def test_chats_through_the_decode_graph_pool_reply_the_same(monkeypatch, greedy):
    """Turns run on a pooled cache (what CUDA does, forced here with eager steps) give the replies of fresh caches,
    for two chats stepped together and then one alone, over several turns."""
    def conversation() -> list[str]:
        model = seeded_model(3)
        a, b = (Chat(model, max_new_tokens=8, seed=None if greedy else s, do_sample=not greedy) for s in (5, 6))
        replies = Chat.say_many([a, b], MESSAGES[:2])
        return replies + Chat.say_many([a, b], MESSAGES[2:4]) + [a.say(MESSAGES[4]), a.say(MESSAGES[5])]

    expected = conversation()
    monkeypatch.setattr("gpt2.dispatch.cuda_graphs_enabled", lambda model: True)
    assert conversation() == expected
