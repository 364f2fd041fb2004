"""What the scheduler takes (a `Job`: prompts and how to continue them) and the events it sends back for it.

A job of P prompts and n choices each runs as P * n rows; choice i continues prompt i // n. Its events arrive in
batches (one call of its sink per scheduler step), from the scheduler's thread. A beam job (num_beams > 1, greedy,
no stop strings) holds P * num_beams rows and returns each prompt's n best hypotheses, all its events in one batch at
the end (beams choose their sequences only then).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..beam_search import EarlyStopping
from ..sampling import SamplingParams


@dataclass(frozen=True)
class Job:
    prompts: list[list[int]]  # token ids, each checked against the vocabulary and the context length
    params: SamplingParams  # max_new_tokens and eos included; params.seed seeds the job's one random stream
    n: int = 1  # choices per prompt
    stop: list[str] = field(default_factory=list)  # a choice ends once its text holds one; the text stops before it
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely tokens'
    timeout_s: float = 600.0  # from submission to the last token; past it the job fails
    num_beams: int = 1  # > 1: beam search (`gpt2.generation.beam_steps`), n being its num_return_sequences
    length_penalty: float = 1.0  # beams only, as transformers'
    early_stopping: EarlyStopping = False  # beams only, as transformers'

    @property
    def rows(self) -> int:
        """Its choices."""
        return len(self.prompts) * self.n

    @property
    def held_rows(self) -> int:
        """The rows it decodes at once: its choices, or its beams."""
        return len(self.prompts) * (self.num_beams if self.num_beams > 1 else self.n)


@dataclass(frozen=True)
class Token:
    """Choice `choice` took `token`; `text` is the text released with it (may be empty: a character still incomplete,
    or text that could begin a stop string, held back until the next token tells)."""

    choice: int
    token: int
    text: str
    logprob: float | None = None  # log-softmax of the raw logits (before penalties and temperature)
    top: list[tuple[int, float]] | None = None  # the job's `logprobs` most likely (token, log-probability)


@dataclass(frozen=True)
class Finish:
    """Choice `choice` ended: reason "stop" (end of text or a stop string) or "length" (max_new_tokens); `text` is
    what was held back, up to the stop string."""

    choice: int
    reason: str
    text: str = ""


@dataclass(frozen=True)
class Failure:
    """The whole job ended without finishing: status is the HTTP status that fits (504 timeout, 500 model error)."""

    status: int
    message: str


Event = Token | Finish | Failure
Sink = Callable[[list[Event]], None]  # called from the scheduler's thread; must not block
