"""Choosing the next token from logits: penalties, bans, temperature / top-k / top-p, greedy or seeded sampling.

Applied in the order Hugging Face `generate` applies them (repetition penalty, no-repeat n-gram,
min-new-tokens, then temperature, top-k, top-p), so greedy and sampled outputs agree with it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes (a negative seed wraps around 2**64)


def check_seed(seed: object) -> None:
    """Refuse a seed torch cannot take, naming it: an int inside SEED_RANGE, or None."""
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} must be an integer or None")
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ValueError(f"seed={seed!r} is outside the range torch's generators take, [-2**63, 2**64)")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    eos_token_id: int | None = 50256
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r}: {why}")

        for name in ("max_new_tokens", "top_k", "no_repeat_ngram_size", "min_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(name, "must be a non-negative integer")
        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be at least 1")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if self.do_sample and not self.temperature > 0:
            raise bad("temperature", "must be > 0 when sampling")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be > 0 (1.0 disables it)")
        check_seed(self.seed)


class NGramBans:
    """Per row, the tokens that would repeat an n-gram already in that row's text (no_repeat_ngram_size)."""

    def __init__(self, n: int, rows: list[list[int]]) -> None:
        self.n = n
        self.seen: list[dict[tuple[int, ...], set[int]]] = [{} for _ in rows]
        self.tails: list[list[int]] = [[] for _ in rows]
        for row, tokens in enumerate(rows):
            for token in tokens:
                self.append(row, token)

    def append(self, row: int, token: int) -> None:
        tail = self.tails[row]
        tail.append(token)
        if len(tail) >= self.n:
            self.seen[row].setdefault(tuple(tail[-self.n:-1]), set()).add(token)
            del tail[: len(tail) - self.n + 1]

    def reorder(self, parents: list[int]) -> None:
        """Row r takes row parents[r]'s n-grams (a row that keeps its own keeps them uncopied)."""
        seen, tails = self.seen, self.tails
        self.seen = [seen[p] if p == r else {k: set(v) for k, v in seen[p].items()} for r, p in enumerate(parents)]
        self.tails = [tails[p] if p == r else list(tails[p]) for r, p in enumerate(parents)]

    def copy(self) -> NGramBans:
        other = copy.copy(self)
        other.seen = [{k: set(v) for k, v in row.items()} for row in self.seen]
        other.tails = [list(tail) for tail in self.tails]
        return other

    def banned(self, row: int) -> list[int]:
        tail = self.tails[row]
        if len(tail) < self.n - 1:
            return []
        return list(self.seen[row].get(tuple(tail[len(tail) - self.n + 1:]), ()))


class LogitsProcessors:
    """The logits processors of one generation with each row's state: the tokens seen (repetition_penalty), the n-gram
    bans (no_repeat_ngram_size) and the tokens generated so far (min_new_tokens), applied in transformers' order.

    `append` records the tokens each row takes; beam search moves whole rows with `reorder`.
    """

    def __init__(self, params: SamplingParams, histories: list[list[int]], vocab_size: int,
                 device: torch.device) -> None:
        self.params = params
        self.generated = [0] * len(histories)
        self.seen: torch.Tensor | None = None  # (B, V) bool
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(histories), vocab_size, dtype=torch.bool, device=device)
            for i, row in enumerate(histories):
                self.seen[i, row] = True
        self.bans = NGramBans(params.no_repeat_ngram_size, histories) if params.no_repeat_ngram_size > 0 else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) float (or log-probabilities, as beam search processes them) -> processed (B, V); logits may be
        written in place."""
        params = self.params
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, params.repetition_penalty)
        if self.bans is not None:
            for i in range(logits.shape[0]):
                banned = self.bans.banned(i)
                if banned:
                    logits[i, banned] = float("-inf")
        if params.eos_token_id is not None:
            early = [i for i, n in enumerate(self.generated) if n < params.min_new_tokens]
            if early:
                logits[early, params.eos_token_id] = float("-inf")
        return logits

    def append(self, tokens: list[int], rows: list[int]) -> None:
        """Row rows[j] took token tokens[j]."""
        if self.seen is not None and rows:
            self.seen[torch.tensor(rows, device=self.seen.device), torch.tensor(tokens, device=self.seen.device)] = True
        for row, token in zip(rows, tokens):
            self.generated[row] += 1
            if self.bans is not None:
                self.bans.append(row, token)

    def reorder(self, parents: list[int]) -> None:
        """Row r becomes a copy of row parents[r] (beam search: each beam continues its parent's history)."""
        if self.seen is not None:
            self.seen = self.seen[torch.tensor(parents, device=self.seen.device)]
        if self.bans is not None:
            self.bans.reorder(parents)
        self.generated = [self.generated[p] for p in parents]

    def copy(self) -> LogitsProcessors:
        """An independent copy (speculative decoding's draft processes its proposals on one, then drops it)."""
        other = copy.copy(self)
        other.generated = list(self.generated)
        other.seen = None if self.seen is None else self.seen.clone()
        other.bans = None if self.bans is None else self.bans.copy()
        return other


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool. CTRL-style: seen tokens' logits divided (positive) or multiplied (negative)."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # (B, V) ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (B, V) after penalties -> the distribution (B, V) that sampling draws the next token from: `choose_next`'s
    temperature, top-k and top-p over the whole vocabulary (speculative sampling compares two of them)."""
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    return apply_top_p(logits, params.top_p).softmax(dim=-1)


RandomStreams = torch.Generator | list[torch.Generator | None] | None  # one for the batch, or one per row


def choose_next(logits: torch.Tensor, params: SamplingParams, generator: RandomStreams) -> torch.Tensor:
    """logits (B, V) after penalties -> next token ids (B,).

    generator: one random stream for every row, or a list with each row's own (rows may share one; None is
    torch's global stream), which makes a row's draws independent of the other rows in the batch.
    """
    if not params.do_sample:
        return logits.argmax(dim=-1)
    # Shifted so each row's best logit is 0 before scaling: a tiny temperature then sends the others to -inf, never
    # the best to +inf (whose softmax is NaN). Softmax, top-k and top-p are unchanged by the shift.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    token_ids = None
    if 0 < params.top_k < logits.shape[-1]:
        # Only the k best can survive top-k, so top-p and sampling run over (B, k) instead of the
        # whole vocabulary (a 50257-wide sort per step costs milliseconds on the CPU).
        logits, token_ids = torch.topk(logits, params.top_k, dim=-1)  # (B, k) each
    probs = apply_top_p(logits, params.top_p).softmax(dim=-1)  # (B, k or V)
    picks = draw(probs, generator)[:, None]  # (B, 1)
    return (picks if token_ids is None else token_ids.gather(-1, picks))[:, 0]


def draw(probs: torch.Tensor, generator: RandomStreams) -> torch.Tensor:
    """One index per row of probs (B, n), drawn from the row's distribution with its random stream (see
    `choose_next`) -> (B,)."""
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generator)])[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def uniform(rows: int, generator: RandomStreams, device: torch.device) -> torch.Tensor:
    """One draw from U[0, 1) per row, each from the row's random stream (see `choose_next`) -> (rows,)."""
    if isinstance(generator, list):
        return torch.cat([torch.rand(1, generator=g, device=device) for g in generator])
    return torch.rand(rows, generator=generator, device=device)
