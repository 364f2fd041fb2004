"""DialoGPT chat sessions: the training format, turn-aware truncation, a KV cache kept across turns, batching.

History is laid out exactly as DialoGPT was trained: each turn's tokens followed by `<|endoftext|>`,
concatenated, and the model continues with the reply. Before each reply the oldest whole turns are
dropped until history plus the reply budget fit the context (and the optional caps); the newest user
turn is never dropped, only cut from its start, with a `ChatNotice` warning, when alone it cannot fit.
The keys and values of everything already seen are kept between turns, so a turn prefills only its
new tokens (everything again when truncation changed the prefix). In fp32 the reply is the one a from-scratch
`generate` on the same history gives; in bf16 and int8 the keys and values cached by decode steps differ by
rounding from a prefill's, so a reply can differ from it where two tokens' logits nearly tie. Several chats step together as one ragged batch (`Chat.say_many`),
and with a reverse model each reply is chosen among sampled candidates by MMI (`gpt2.mmi`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch

from .dispatch import DecodeFn, generation_cache
from .generation import check_beam_settings, check_count, check_draft
from .beam_search import beam_search
from .decoding import continue_from_cache, prefill, prefill_shared
from .mmi import MMIReranker, check_same_vocabulary, rerank_together
from .sampling import SEED_RANGE, SamplingParams, check_seed
from .speculative import Draft, speculative_decode
from .stop_strings import StopStrings, check_stop_strings

if TYPE_CHECKING:
    from .kv_cache import KVCache
    from .model import GPT2
    from .tokenizer import StreamDecoder

# Against the known failure modes of the model card's greedy loop: sampling with top-k / top-p instead of
# greedy repetition and parroting, no repeated 3-grams, a reply of at least two tokens (never empty).
CHAT_DEFAULTS: dict[str, Any] = dict(
    max_new_tokens=64, do_sample=True, temperature=0.8, top_k=50, top_p=0.9,
    repetition_penalty=1.0, no_repeat_ngram_size=3, min_new_tokens=2,
)
DEFAULT_MAX_HISTORY_TOKENS = 512  # older turns beyond this are dropped (users report ~500 working best)


class ChatNotice(UserWarning):
    """Something the user should know about their turn: it was cut to fit the context."""


def format_history(turns: Sequence[Sequence[int]], eos_token_id: int) -> list[int]:
    """DialoGPT's format: each turn's tokens followed by eos, concatenated."""
    return [t for turn in turns for t in [*turn, eos_token_id]]


def fit_history(turns: list[list[int]], budget: int, max_turns: int | None = None,
                max_tokens: int | None = None) -> tuple[list[list[int]], int]:
    """(the newest turns that fit, tokens cut from the start of the newest turn).

    The formatted history (each turn + eos) of the result is at most `budget` tokens, and older turns
    are also dropped to respect max_turns (counting the newest) and max_tokens. Only whole turns are
    dropped, oldest first; the newest turn is always kept, cut from its start if alone it exceeds budget.
    """
    newest = turns[-1]
    cut = max(0, len(newest) + 1 - budget)
    kept = [newest[cut:]]
    used = len(kept[0]) + 1
    limit = budget if max_tokens is None else min(budget, max_tokens)
    for turn in reversed(turns[:-1]):
        if (max_turns is not None and len(kept) >= max_turns) or used + len(turn) + 1 > limit:
            break
        kept.append(turn)
        used += len(turn) + 1
    kept.reverse()
    return kept, cut


@dataclasses.dataclass
class _TurnPlan:
    """One chat's part of a step: the history the reply answers and how much of it is cached already."""

    turns: list[list[int]]  # kept history, newest user turn last
    context: list[int]  # format_history(turns)
    reused: int  # leading context tokens whose keys/values the chat holds


class Chat:
    """A conversation with a DialoGPT model: `say(text)` returns the reply and remembers both turns.

    Sampling settings default to CHAT_DEFAULTS and are overridden by keyword (SamplingParams' fields, e.g.
    `do_sample=False` for greedy, `max_new_tokens=40`). max_history_turns / max_history_tokens cap the
    history the model sees (None: only the context length limits it). seed makes replies reproducible
    (turn n samples with seed + n). With reverse_model, each reply is the MMI pick among n_candidates
    sampled replies (temperature mmi_temperature; source: the newest mmi_source_turns turns). stop_strings: a reply
    ends once its text contains one of them (the token completing it kept), as in `generate`.

    Decoding as in `generate`: num_beams > 1 replies with the best beam (length_penalty, early_stopping; greedy only);
    num_return_sequences > 1 samples that many replies from one prefill and keeps the one of the highest mean token
    log-probability (n-best; with a reverse model, n_candidates are reranked by MMI instead); draft_model speculates.
    """

    def __init__(self, model: GPT2, *, max_history_turns: int | None = None,
                 max_history_tokens: int | None = DEFAULT_MAX_HISTORY_TOKENS, seed: int | None = None,
                 reverse_model: GPT2 | None = None, n_candidates: int = 10, mmi_temperature: float = 0.0,
                 mmi_source_turns: int = 1, stop_strings: str | Sequence[str] | None = None, num_beams: int = 1,
                 length_penalty: float = 1.0, early_stopping: bool | str = False, num_return_sequences: int = 1,
                 draft_model: GPT2 | None = None, **sampling: Any) -> None:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("the model has no tokenizer: load it with gpt2.load(), or set "
                             "model.tokenizer = gpt2.tokenizer.Tokenizer.default()")
        unknown = sorted(set(sampling) - set(CHAT_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown chat setting(s) {', '.join(unknown)}; sampling settings are "
                             f"{', '.join(CHAT_DEFAULTS)} (eos is the tokenizer's; seed is Chat's own argument)")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_id: int = tokenizer.eos_token_id
        self.params = SamplingParams(**{**CHAT_DEFAULTS, **sampling}, eos_token_id=self.eos_token_id)
        self.budget = model.config.n_positions - self.params.max_new_tokens  # history tokens that fit with a reply
        if self.budget < 2:
            raise ValueError(f"max_new_tokens={self.params.max_new_tokens} leaves no room for history in the "
                             f"model's {model.config.n_positions} positions")
        for name, cap in (("max_history_turns", max_history_turns), ("max_history_tokens", max_history_tokens)):
            if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
                raise ValueError(f"{name}={cap!r} must be a positive integer or None")
        check_seed(seed)
        self.stop_strings = check_stop_strings(stop_strings)
        check_count("num_return_sequences", num_return_sequences)
        check_beam_settings(num_beams, length_penalty, early_stopping, num_return_sequences, self.params,
                            self.stop_strings, None)
        if num_beams > 1 and num_return_sequences > 1:
            raise ValueError(f"num_return_sequences={num_return_sequences} with num_beams={num_beams}: a chat keeps "
                             "one reply, the best beam")
        if reverse_model is not None and num_return_sequences > 1:
            raise ValueError(f"num_return_sequences={num_return_sequences} with a reverse model: its candidates are "
                             "n_candidates, reranked by MMI")
        if draft_model is not None:
            check_draft(model, draft_model, num_beams)
        self.beams = (num_beams, length_penalty, early_stopping)
        self.draft_model = draft_model
        self.max_history_turns = max_history_turns
        self.max_history_tokens = max_history_tokens
        self.seed = seed
        self.reranker: MMIReranker | None = None
        self.n_candidates = num_return_sequences  # sampled replies per turn
        if reverse_model is not None:
            check_same_vocabulary(model, reverse_model)
            if not self.params.do_sample:
                raise ValueError("MMI reranking needs sampled candidates: greedy (do_sample=False) gives N copies "
                                 "of one reply")
            if not isinstance(n_candidates, int) or n_candidates < 1:
                raise ValueError(f"n_candidates={n_candidates!r} must be a positive integer")
            self.reranker = MMIReranker(reverse_model, mmi_temperature, mmi_source_turns)
            self.n_candidates = n_candidates
        self.turns: list[list[int]] = []  # the history the model sees, oldest first, as token ids (no eos)
        self._cached: list[int] = []  # tokens whose keys/values _kv holds
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None  # each (L, H, len(_cached), D)
        self._replies = 0

    @property
    def history(self) -> list[str]:
        """The turns the model sees now, as text, oldest first (the user's turns and the replies alternate)."""
        return [self.tokenizer.decode(turn) for turn in self.turns]

    def context_ids(self) -> list[int]:
        """The history in DialoGPT format (each turn + eos), as the model reads it."""
        return format_history(self.turns, self.eos_token_id)

    def reset(self) -> None:
        """Forget the conversation (and its cache); the seed sequence starts over."""
        self.turns, self._cached, self._kv, self._replies = [], [], None, 0

    def say(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The reply to text; on_text receives the reply's text piece by piece as it is generated."""
        stream = None if on_text is None else (lambda _row, piece: on_text(piece))
        return Chat.say_many([self], [text], stream)[0]

    @staticmethod
    @torch.inference_mode()
    def say_many(chats: Sequence[Chat], texts: Sequence[str],
                 on_text: Callable[[int, str], None] | None = None) -> list[str]:
        """One turn of several chats, generated as one ragged batch; on_text(chat index, text piece) streams.

        The chats must share the model and sampling settings (seeds may differ). Each chat samples from its
        own random stream, so its reply is the one it would give alone (in fp32; see the module docstring). A chat with a reverse model
        prefills its turn once and samples its n_candidates replies from copies of that cache; the candidates of all
        chats sharing a reverse model are scored in one batched forward, and MMI chats stream their reply once it is
        chosen.
        """
        chats = list(chats)
        _check_batch(chats, texts)
        first = chats[0]
        model, params = first.model, first.params
        user_turns = [chat._user_turn(text) for chat, text in zip(chats, texts)]  # all checked before any work
        plans = [chat._plan(turn) for chat, turn in zip(chats, user_turns)]

        per_chat = first.beams[0] if first.beams[0] > 1 else None  # rows per chat: its beams or its candidates
        owner = [c for c, chat in enumerate(chats) for _ in range(per_chat or chat.n_candidates)]  # row -> chat
        length = max(len(plan.context) for plan in plans) + params.max_new_tokens
        with ExitStack() as stack:
            cache, decode = stack.enter_context(generation_cache(model, len(owner), length))
            draft = None
            if first.draft_model is not None:  # the draft reads the whole context each turn (it keeps no cache)
                draft = Draft(first.draft_model, *stack.enter_context(generation_cache(first.draft_model, len(owner),
                                                                                       length)))
                prefill_shared(draft.model, draft.cache, [plan.context for plan in plans], owner)
            return Chat._reply(chats, plans, owner, cache, decode, draft, on_text)

    @staticmethod
    def _reply(chats: list[Chat], plans: list[_TurnPlan], owner: list[int], cache: KVCache, decode: DecodeFn,
               draft: Draft | None, on_text: Callable[[int, str], None] | None) -> list[str]:
        """say_many's turn over an empty cache of a row per reply candidate or beam (row r answers chat owner[r]),
        decode being its step (draft: the draft model's, its cache prefilled); commits each reply. Each chat's turn is
        prefilled once: straight into cache where each chat has one row, else into a cache of a row per chat whose
        rows cache then copies."""
        logits = Chat._prefill_turn(chats, plans, owner, cache)
        if chats[0].beams[0] > 1:
            return Chat._beam_replies(chats, plans, cache, decode, logits, on_text)
        return Chat._sampled_replies(chats, plans, owner, cache, decode, draft, logits, on_text)

    @staticmethod
    def _prefill_turn(chats: list[Chat], plans: list[_TurnPlan], owner: list[int], cache: KVCache) -> torch.Tensor:
        """Each chat's kept keys and values and its turn's new tokens into its rows of cache; logits (R, V)."""
        model = chats[0].model
        shared = len(owner) == len(chats)
        per_chat = cache if shared else model.new_cache(len(chats), max(len(plan.context) for plan in plans))
        for c, (chat, plan) in enumerate(zip(chats, plans)):
            if plan.reused:
                k, v = chat._kv  # each (L, H, n, D)
                per_chat.k[:, c, :, :plan.reused] = k[:, :, :plan.reused]
                per_chat.v[:, c, :, :plan.reused] = v[:, :, :plan.reused]
        per_chat.lengths = [plan.reused for plan in plans]
        logits = prefill(model, per_chat, [plan.context[plan.reused:] for plan in plans])  # (C, V)
        if not shared:
            cache.take_rows(per_chat, owner)
            logits = logits[torch.tensor(owner, device=logits.device)]  # (R, V)
        return logits

    @staticmethod
    def _beam_replies(chats: list[Chat], plans: list[_TurnPlan], cache: KVCache, decode: DecodeFn,
                      logits: torch.Tensor, on_text: Callable[[int, str], None] | None) -> list[str]:
        """Each chat's reply by beam search over its num_beams rows (streamed once found)."""
        first = chats[0]
        num_beams, length_penalty, early_stopping = first.beams
        out = beam_search(first.model, cache, logits, [plan.context for plan in plans], first.params, decode,
                          num_beams, length_penalty, early_stopping, 1)
        return [chat._commit(plan, reply, cache, c * num_beams, reply_cached=False, on_text=on_text, c=c)
                for c, (chat, plan, reply) in enumerate(zip(chats, plans, out.sequences))]

    @staticmethod
    def _sampled_replies(chats: list[Chat], plans: list[_TurnPlan], owner: list[int], cache: KVCache,
                         decode: DecodeFn, draft: Draft | None, logits: torch.Tensor,
                         on_text: Callable[[int, str], None] | None) -> list[str]:
        """Each chat's reply, greedy or sampled (with the draft where given): its row's, or the best of its candidate
        rows by MMI or mean log-probability. A chat with one row streams its reply as it comes, the others once
        chosen."""
        first = chats[0]
        model, params = first.model, first.params
        decoders: dict[int, StreamDecoder] = {}
        on_token = None
        if on_text is not None:
            decoders = {row: first.tokenizer.stream_decoder() for row, c in enumerate(owner)
                        if chats[c].n_candidates == 1}

            def on_token(row: int, token: int) -> None:
                if row in decoders and (piece := decoders[row].push(token)):
                    on_text(owner[row], piece)

        seeds = [chat._turn_seed() for chat in chats]
        streams = [None if seed is None else torch.Generator(device=model.device).manual_seed(seed) for seed in seeds]
        stops = StopStrings(first.tokenizer, first.stop_strings, len(owner)) if first.stop_strings else None
        row_generators = [streams[c] for c in owner] if params.do_sample else None
        n_best = any(chat.n_candidates > 1 and chat.reranker is None for chat in chats)
        histories = [plans[c].context for c in owner]
        if draft is None:
            out = continue_from_cache(model, cache, logits, histories, params, on_token, row_generators, decode, stops,
                                      with_logprobs=n_best)
        else:
            out = speculative_decode(model, cache, decode, draft, logits, histories, params, on_token, stops,
                                     with_logprobs=n_best, row_generators=row_generators)
        outputs = out.sequences

        rows = [[row for row, o in enumerate(owner) if o == c] for c in range(len(chats))]  # each chat's rows
        chosen = [chat_rows[0] if len(chat_rows) == 1 or chats[c].reranker is not None
                  else max(chat_rows, key=lambda r: sum(out.logprobs[r]) / max(len(out.logprobs[r]), 1))
                  for c, chat_rows in enumerate(rows)]
        mmi = [c for c, chat in enumerate(chats) if chat.reranker is not None]
        picks = rerank_together([chats[c].reranker for c in mmi], [plans[c].turns for c in mmi],
                                [[outputs[r] for r in rows[c]] for c in mmi],
                                [None if seeds[c] is None else torch.Generator().manual_seed(seeds[c]) for c in mmi])
        for c, (best, _) in zip(mmi, picks):
            chosen[c] = rows[c][best]

        return [chat._commit(plan, outputs[chosen[c]], cache, chosen[c], reply_cached=True, on_text=on_text, c=c,
                             decoder=decoders.get(chosen[c]))
                for c, (chat, plan) in enumerate(zip(chats, plans))]

    def _user_turn(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"a chat message must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("empty message: type some text (whitespace alone is not a turn)")
        return self.tokenizer.encode(text)

    def _plan(self, user_turn: list[int]) -> _TurnPlan:
        turns, cut = fit_history(self.turns + [user_turn], self.budget, self.max_history_turns,
                                 self.max_history_tokens)
        if cut:
            warnings.warn(ChatNotice(
                f"your message is {len(user_turn)} tokens; with the {self.params.max_new_tokens}-token reply budget "
                f"only {len(turns[-1])} fit in the model's {self.model.config.n_positions} positions, so its first "
                f"{cut} tokens were dropped"))
        context = format_history(turns, self.eos_token_id)
        n = len(self._cached)
        return _TurnPlan(turns, context, n if context[:n] == self._cached else 0)

    def _turn_seed(self) -> int | None:
        return None if self.seed is None else (self.seed + self._replies) % SEED_RANGE[1]

    def _commit(self, plan: _TurnPlan, reply: list[int], cache: KVCache, row: int, reply_cached: bool,
                on_text: Callable[[int, str], None] | None, c: int, decoder: StreamDecoder | None = None) -> str:
        """Remember the turn and the keys/values of cache's row (holding the reply but its last token where
        reply_cached, else the context alone: beam search's rows moved on from the chosen beam); stream what is left
        of the reply as chat c's (what decoder holds back, or the whole text where it was not streamed); returns the
        reply's text."""
        reply_turn = reply[:-1] if reply and reply[-1] == self.eos_token_id else reply
        cached = plan.context + reply[:-1] if reply_cached else plan.context  # the last chosen token was not fed
        kv = (cache.k[:, row, :, :len(cached)].clone(), cache.v[:, row, :, :len(cached)].clone())  # (L, H, n, D)
        text = self.tokenizer.decode(reply_turn, skip_special_tokens=True)
        # Everything slow is done: the chat's state changes in one statement, so a Ctrl-C (KeyboardInterrupt) that
        # stops a reply leaves the chat as it was before the turn, not half-updated.
        self._kv, self._cached, self.turns, self._replies = (kv, cached, plan.turns + [reply_turn], self._replies + 1)
        if on_text is not None and (tail := decoder.flush() if decoder is not None else text):
            on_text(c, tail)
        return text


def _check_batch(chats: list[Chat], texts: Sequence[str]) -> None:
    if not chats:
        raise ValueError("no chats to step")
    if isinstance(texts, str) or len(texts) != len(chats):
        raise ValueError(f"give one message per chat: {len(chats)} chats, "
                         f"{'a single string' if isinstance(texts, str) else len(texts)} messages")
    if len({id(chat) for chat in chats}) != len(chats):
        raise ValueError("the same chat appears twice in one step")
    first = chats[0]
    for i, chat in enumerate(chats[1:], 1):
        if chat.model is not first.model:
            raise ValueError(f"chat {i} talks to a different model than chat 0: a batch runs on one model")
        if dataclasses.replace(chat.params, seed=None) != dataclasses.replace(first.params, seed=None):
            raise ValueError(f"chat {i} has different sampling settings than chat 0 ({chat.params} vs "
                             f"{first.params}): step them separately")
        if (chat.beams, chat.draft_model) != (first.beams, first.draft_model):
            raise ValueError(f"chat {i} decodes differently than chat 0 (num_beams, length_penalty, early_stopping "
                             f"{chat.beams} vs {first.beams}, or another draft model): step them separately")
        if chat.stop_strings != first.stop_strings:
            raise ValueError(f"chat {i} has different stop_strings than chat 0 ({chat.stop_strings} vs "
                             f"{first.stop_strings}): step them separately")
