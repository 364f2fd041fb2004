"""Whether speculative decoding's drafting pays, measured as it runs: the tokens per second of the recent rounds
against those of the target's plain decode step.

A round's rate is the tokens its live rows took over its wall time (the draft's steps, the target's check and the
bookkeeping); a plain step's rate is its live rows over its wall time. The first round is not timed (it warms the
draft's decode step: on CUDA it captures its graph). After `WINDOW` timed rounds the target runs `PLAIN_PROBES` plain
steps, which take their tokens as the plain loop would; the fastest of them (the first may capture a graph too) is the
plain rate. From then on, after every round, drafting stops for the rest of the generation where the last `WINDOW`
rounds together ran under `STOP_BELOW` times the plain rate: the window and the margin keep noise from dropping a
draft that pays. Drafting does not resume: the draft would first have to take every token it missed, one decode step
each (`gpt2.speculative.propose`), which is what a re-probe would cost. Why: docs/performance.md, "gpt2/speculative.py:
when drafting stops".
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

clock = time.perf_counter  # the gate's time in seconds; tests replace it to make rounds look slow or fast

WARMUP_ROUNDS = 1  # untimed first rounds: they warm the draft's decode step
WINDOW = 4  # timed rounds before a decision, and the rounds each decision weighs
PLAIN_PROBES = 2  # timed plain steps before a decision
STOP_BELOW = 0.9  # drafting stops where its rounds' rate falls under this share of the plain steps'
TINY_SECONDS = 1e-9  # the least a step is taken to last, so a coarse clock never divides by zero


@dataclass
class DraftGate:
    """Times each round and plain step between `begin` and `round_done` or `plain_done`, and says whether the next
    one should draft (`plain_due`); `stopped_after` is the number of rounds run before drafting stopped, or None."""

    rounds: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=WINDOW))  # (seconds, tokens)
    plain_steps: int = 0
    fastest_plain: float = float("inf")  # seconds per token of the fastest plain step
    rounds_run: int = 0
    stopped_after: int | None = None
    began: float = 0.0

    def plain_due(self) -> bool:
        """Whether the next step should be a plain target step: drafting stopped, or the plain rate is wanted."""
        return self.stopped_after is not None or (len(self.rounds) == WINDOW and self.plain_steps < PLAIN_PROBES)

    def begin(self) -> None:
        """A round or plain step starts now."""
        self.began = clock()

    def round_done(self, tokens: int) -> None:
        """The round begun last took tokens (over all its rows)."""
        seconds = clock() - self.began
        self.rounds_run += 1
        if self.rounds_run > WARMUP_ROUNDS:
            self.rounds.append((seconds, tokens))
        self.decide()

    def plain_done(self, tokens: int) -> None:
        """The plain step begun last took tokens (one per live row)."""
        seconds = max(clock() - self.began, TINY_SECONDS)
        self.plain_steps += 1
        self.fastest_plain = min(self.fastest_plain, seconds / tokens)
        self.decide()

    def decide(self) -> None:
        """Stop drafting where the last WINDOW rounds ran under STOP_BELOW times the fastest plain step's rate."""
        if self.stopped_after is not None or len(self.rounds) < WINDOW or self.plain_steps < PLAIN_PROBES:
            return
        seconds = max(sum(s for s, _ in self.rounds), TINY_SECONDS)
        if sum(t for _, t in self.rounds) / seconds < STOP_BELOW / self.fastest_plain:
            self.stopped_after = self.rounds_run
