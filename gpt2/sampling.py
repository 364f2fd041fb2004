"""Choosing the next token from logits: penalties, bans, temperature / top-k / top-p, greedy or seeded sampling.

Applied in the order Hugging Face `generate` applies them (repetition penalty, no-repeat n-gram,
min-new-tokens, then temperature, top-k, top-p), so greedy and sampled outputs agree with it.
"""

from __future__ import annotations

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

    def banned(self, row: int) -> list[int]:
        tail = self.tails[row]
        if len(tail) < self.n - 1:
            return []
        return list(self.seen[row].get(tuple(tail[len(tail) - self.n + 1:]), ()))


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
    if isinstance(generator, list):
        picks = torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generator)])
    else:
        picks = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    return (picks if token_ids is None else token_ids.gather(-1, picks))[:, 0]
