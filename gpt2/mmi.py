"""MMI reranking, as in the DialoGPT paper: rerank sampled replies by a reverse model's log P(source | reply).

The reverse (backward) model reads the dialogue backwards in DialoGPT format: the candidate reply, then
the source turns newest first, each followed by `<|endoftext|>`. The candidate whose reply best
predicts the source wins (or one is sampled from softmax(score / temperature)). Any forward / reverse
pair of loaded models works as long as they share the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .scoring import score

if TYPE_CHECKING:
    from .model import GPT2

_VOCAB_PROBE = "Hello, wörld! 123 <|endoftext|> naïve 😀"


def check_same_vocabulary(model: GPT2, reverse_model: GPT2) -> None:
    """Raise ValueError unless the two models share vocabulary size, end-of-text id and (if attached) tokenization."""
    a, b = model.config, reverse_model.config
    if a.vocab_size != b.vocab_size or a.eos_token_id != b.eos_token_id:
        raise ValueError(f"the reverse model does not share the forward model's vocabulary: vocab_size "
                         f"{b.vocab_size} vs {a.vocab_size}, eos id {b.eos_token_id} vs {a.eos_token_id}")
    tok_a, tok_b = getattr(model, "tokenizer", None), getattr(reverse_model, "tokenizer", None)
    if tok_a is not None and tok_b is not None and tok_a.encode(_VOCAB_PROBE) != tok_b.encode(_VOCAB_PROBE):
        raise ValueError("the reverse model's tokenizer splits text differently from the forward model's: "
                         "MMI needs both models on the same vocabulary")


@dataclass
class MMIReranker:
    """Scores candidate replies with a reverse model and picks one.

    temperature 0 picks the best-scoring candidate; temperature > 0 samples from softmax(score / temperature).
    source_turns: how many of the newest history turns form the source (1: the message being answered).
    """

    reverse_model: GPT2
    temperature: float = 0.0
    source_turns: int = 1

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"MMI temperature={self.temperature!r} must be >= 0 (0 picks the best candidate)")
        if not isinstance(self.source_turns, int) or self.source_turns < 1:
            raise ValueError(f"MMI source_turns={self.source_turns!r} must be a positive integer")

    def source(self, history: list[list[int]]) -> list[int]:
        """The reverse model's target: the newest source_turns turns, newest first, each followed by eos."""
        eos = self.reverse_model.config.eos_token_id
        return [t for turn in reversed(history[-self.source_turns:]) for t in turn + [eos]]

    def pairs(self, history: list[list[int]], candidates: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
        """(contexts, continuations) whose `score` under the reverse model is each candidate's MMI score: the candidate
        (a trailing eos dropped) + eos, then the source."""
        if not history:
            raise ValueError("MMI needs at least one history turn to score the candidates against")
        eos = self.reverse_model.config.eos_token_id
        replies = [(c[:-1] if c and c[-1] == eos else list(c)) + [eos] for c in candidates]
        return replies, [self.source(history)] * len(replies)

    def scores(self, history: list[list[int]], candidates: list[list[int]]) -> list[float]:
        """log P(source | candidate) under the reverse model, for each candidate (a trailing eos is ignored)."""
        return score(self.reverse_model, *self.pairs(history, candidates))

    def pick(self, scores: list[float], generator: torch.Generator | None = None) -> int:
        """Index of the chosen candidate: the best, or sampled from softmax(scores / temperature)."""
        if not scores:
            raise ValueError("no candidates to pick from")
        values = torch.tensor(scores, dtype=torch.float64)  # (N,)
        if self.temperature == 0:
            return int(values.argmax())
        probs = (values / self.temperature).softmax(dim=0)
        return int(torch.multinomial(probs, 1, generator=generator))

    def rerank(self, history: list[list[int]], candidates: list[list[int]],
               generator: torch.Generator | None = None) -> tuple[int, list[float]]:
        """(chosen index, every candidate's score) for candidates replying to history (turns, oldest first)."""
        scores = self.scores(history, candidates)
        return self.pick(scores, generator), scores


def rerank_together(rerankers: list[MMIReranker], histories: list[list[list[int]]],
                    candidates: list[list[list[int]]],
                    generators: list[torch.Generator | None]) -> list[tuple[int, list[float]]]:
    """`MMIReranker.rerank` for several chats at once, (chosen index, scores) for each: the candidates of every chat
    whose reranker shares a reverse model are scored in one batched `score` call (one forward, not one per chat)."""
    results: list[tuple[int, list[float]]] = [(0, [])] * len(rerankers)
    by_model: dict[int, list[int]] = {}
    for j, reranker in enumerate(rerankers):
        by_model.setdefault(id(reranker.reverse_model), []).append(j)
    for jobs in by_model.values():
        contexts: list[list[int]] = []
        continuations: list[list[int]] = []
        for j in jobs:
            replies, sources = rerankers[j].pairs(histories[j], candidates[j])
            contexts += replies
            continuations += sources
        scores = score(rerankers[jobs[0]].reverse_model, contexts, continuations)
        start = 0
        for j in jobs:
            mine = scores[start:start + len(candidates[j])]
            start += len(candidates[j])
            results[j] = (rerankers[j].pick(mine, generators[j]), mine)
    return results
