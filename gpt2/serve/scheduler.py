"""The continuous-batching loop: one thread owns the model and its slots, and jobs join and leave the running batch at
every decode step.

Each turn: take the jobs submitted since the last one; end the cancelled and the expired, freeing their slots; admit
waiting jobs, first come first served, while their rows fit the slots not yet promised, as one prefill group; run one
chunk of that group's prefill (at most prefill_chunk tokens, so that a long prompt delays the running rows' next
token by one chunk, not by the whole prompt), loading each prompt that completes into its choices' slots and choosing
their first tokens; then one decode step over every slot, each running choice taking its next token through its own
logits processors and random stream. Tokens go to each job's sink as they are chosen. Then each running beam job
(num_beams > 1) takes one step of its own: its prefill, or one decode step of its beams in a cache of its own and their
bookkeeping (`gpt2.generation.beam_steps`), so that a beam search runs beside the batch, a step a turn, rather than
stalling it, and every model call stays on this thread. Its beams count against max_batch as a job's choices do.

A choice's tokens depend on its own prompt, parameters and random stream only: in fp32 a prefill, chunked or not,
alone or in a ragged group, and a batched decode step compute each row as alone, so a greedy choice equals
`generate` on its prompt alone whatever else runs, and a beam job equals `generate`'s beams
(tests/test_serve_scheduler.py).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..beam_search import Steps
from ..decoding import GenerateOutput, NonFiniteLogitsError, check_finite
from ..generation import beam_steps
from ..sampling import SEED_RANGE, LogitsProcessors, choose_next
from .job import Event, Failure, Finish, Job, Sink, Token
from .slots import SlotCache
from .text import ChoiceText

if TYPE_CHECKING:
    from ..kv_cache import KVCache
    from ..model import GPT2
    from .metrics import ServeMetrics

log = logging.getLogger("gpt2.serve")


class QueueFull(Exception):
    """More jobs wait than the queue holds: try again later."""


class SchedulerClosed(Exception):
    """The scheduler is shutting down and takes no more jobs."""


class Ticket:
    """A submitted job's state in the scheduler; `cancel()` (from any thread) ends it at the scheduler's next turn."""

    def __init__(self, job: Job, sink: Sink, scheduler: Scheduler) -> None:
        self.job = job
        self.sink = sink
        self.arrival = time.monotonic()
        self.deadline = self.arrival + job.timeout_s
        self.cancelled = False
        self.ended = False  # scheduler thread only, like the rest below
        self.choices_left = job.rows
        self.reserved = 0  # slots promised to its choices whose prompt is still prefilling
        self.first_token_at: float | None = None
        self.beams: Steps[GenerateOutput] | None = None  # a running beam job's search
        self._scheduler = scheduler

    def cancel(self) -> None:
        self.cancelled = True
        self._scheduler.wake()


@dataclass
class Choice:
    """One running row: a choice of a job, in a slot, with its own processors, random stream and text."""

    ticket: Ticket
    index: int  # the choice's index in the job (prompt index * n + j)
    processors: LogitsProcessors
    generator: torch.Generator | None
    text: ChoiceText
    slot: int = -1
    next_token: int = -1  # the token to feed at the next decode step
    generated: int = 0
    last_token_at: float = 0.0

    @property
    def batched_greedy(self) -> bool:
        """Greedy with nothing that changes the logits but min_new_tokens' ban on end of text, and no logprobs: its
        token is the argmax of the raw logits, end of text masked while `bans_end_of_text`."""
        job = self.ticket.job
        params = job.params
        return (not params.do_sample and params.repetition_penalty == 1.0 and params.no_repeat_ngram_size == 0
                and job.logprobs is None)

    @property
    def bans_end_of_text(self) -> bool:
        """min_new_tokens still holds end of text back from this choice (as `LogitsProcessors` does)."""
        params = self.ticket.job.params
        return params.eos_token_id is not None and self.generated < params.min_new_tokens


@dataclass
class PrefillGroup:
    """Prompts of jobs admitted together, prefilled chunk by chunk into a cache of their own, then loaded into their
    choices' slots: entries[i] = (ticket, prompt index) is the group cache's row i."""

    entries: list[tuple[Ticket, int]]
    cache: KVCache  # len(entries) rows
    done: list[int] = field(default_factory=list)  # tokens of each prompt prefilled so far

    def prompt(self, row: int) -> list[int]:
        ticket, index = self.entries[row]
        return ticket.job.prompts[index]

    @property
    def finished(self) -> bool:
        return all(d == len(self.prompt(i)) or self.entries[i][0].ended for i, d in enumerate(self.done))


class Scheduler:
    """Runs jobs on model in one batch, on a thread of its own (`start`, `stop`); `submit` from any thread."""

    def __init__(self, model: GPT2, metrics: ServeMetrics, max_batch: int = 16, max_queue: int = 64,
                 prefill_chunk: int = 256) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self.model = model
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._wakeup = threading.Condition()
        self._inbox: list[Ticket] = []  # submitted, not yet seen by the loop
        self._pending = 0  # submitted and not yet admitted (inbox + waiting): what max_queue bounds
        self._closed = False
        self._thread: threading.Thread | None = None
        # The loop's own state (its thread only).
        self._waiting: list[Ticket] = []
        self._group: PrefillGroup | None = None
        self._running: list[Choice] = []
        self._reserved = 0
        self._beams: list[Ticket] = []  # running beam jobs
        self._beam_rows = 0  # the rows they hold
        self._slots: SlotCache | None = None
        metrics.max_batch.set(max_batch)

    # --- any thread ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gpt2-serve-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Take no more jobs, end those left (their clients are gone by now: the server drains before it stops the
        scheduler) and join the thread."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job, sink: Sink) -> Ticket:
        """Queue job; its events go to sink. Raises QueueFull beyond max_queue waiting jobs, SchedulerClosed once
        stopping. The job must have been checked (`gpt2.serve.requests`): rows <= max_batch, prompts in context."""
        if job.held_rows > self.max_batch:
            raise ValueError(f"the job has {job.held_rows} rows, more than max_batch={self.max_batch}")
        ticket = Ticket(job, sink, self)
        with self._wakeup:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if self._pending >= self.max_queue:
                raise QueueFull(f"{self._pending} requests are waiting already (--max-queue {self.max_queue})")
            self._pending += 1
            self._inbox.append(ticket)
            self.metrics.queue_length.set(self._pending)
            self._wakeup.notify()
        return ticket

    def wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    @property
    def queue_length(self) -> int:
        return self._pending

    # --- the loop's thread ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            self._slots = SlotCache(self.model, self.max_batch)
            while True:
                with self._wakeup:
                    while not (self._inbox or self._busy or self._closed):
                        self._wakeup.wait()
                    if self._closed:
                        break
                    self._waiting += self._inbox
                    self._inbox.clear()
                try:
                    self._turn()
                except Exception as e:  # noqa: BLE001 - whatever went wrong, the server stays up
                    log.exception("a scheduler turn failed")
                    self._fail_all(Failure(500, f"the server failed on this request: {type(e).__name__}: {e}"))
            with self._wakeup:  # closed: nothing joins the inbox any more
                self._waiting += self._inbox
                self._inbox.clear()
            self._fail_all(Failure(503, "the server shut down before this request finished"))

    @property
    def _busy(self) -> bool:
        return bool(self._waiting or self._group or self._running or self._beams)

    def _turn(self) -> None:
        self._reap(time.monotonic())
        self._admit()
        if self._group is not None:
            group = self._group
            if not self._guarded(self._prefill, [ticket for ticket, _ in group.entries]):
                self._group = None
        if self._running:
            self._guarded(self._decode, [choice.ticket for choice in self._running])
        for ticket in list(self._beams):
            self._advance(ticket)
        if self._group is None:
            self._remap(self._slots.shrink())
        self._update_gauges()

    def _guarded(self, phase: Callable[[], None], tickets: list[Ticket]) -> bool:
        """Run a phase; if it raises, fail the jobs it was running (their slots freed, the others' untouched) and
        return False."""
        try:
            phase()
            return True
        except Exception as e:  # noqa: BLE001 - one bad step must not take the server down
            log.exception("a scheduler step failed")
            for ticket in _unique(tickets):
                self._fail(ticket, Failure(500, f"the model failed on this request: {type(e).__name__}: {e}"))
            return False

    def _fail_all(self, failure: Failure) -> None:
        """Fail every job the loop holds (those still in the inbox join at the next turn)."""
        for ticket in self._held():
            self._fail(ticket, failure)
        self._group = None

    def _reap(self, now: float) -> None:
        """End the jobs whose client went away or whose time ran out."""
        for ticket in self._held():
            if ticket.cancelled:
                self._end(ticket, "cancelled")
            elif now >= ticket.deadline:
                self._fail(ticket, Failure(504, f"the request timed out after {ticket.job.timeout_s:g} s"),
                           "timeout")

    def _held(self) -> list[Ticket]:
        """Every job the loop holds, once each."""
        tickets = [*self._waiting, *(c.ticket for c in self._running), *self._beams]
        if self._group is not None:
            tickets += [ticket for ticket, _ in self._group.entries]
        return _unique(tickets)

    def _admit(self) -> None:
        """Waiting jobs, oldest first, while their rows fit the unpromised slots: beam jobs start their search, the
        others join a new prefill group."""
        if self._group is not None:
            return
        admitted = []
        free = self.max_batch - self._slots.in_use - self._reserved - self._beam_rows
        taken = 0
        while self._waiting and self._waiting[0].job.held_rows <= free:
            ticket = self._waiting.pop(0)
            taken += 1
            free -= ticket.job.held_rows
            if ticket.job.num_beams > 1:
                self._start_beams(ticket)
                continue
            ticket.reserved = ticket.job.rows
            self._reserved += ticket.job.rows
            admitted.append(ticket)
        with self._wakeup:
            self._pending -= taken
        if not admitted:
            return
        self._slots.reserve(self._reserved)  # one resize for all the admitted choices, not one per bucket
        entries = [(ticket, p) for ticket in admitted for p in range(len(ticket.job.prompts))]
        cache = self.model.new_cache(len(entries), max(len(t.job.prompts[p]) for t, p in entries))
        self._group = PrefillGroup(entries, cache, [0] * len(entries))

    def _prefill(self) -> None:
        """One chunk of the group's prompts: at most prefill_chunk tokens in all (each row padded to the chunk); each
        prompt it completes goes into its choices' slots with their first tokens."""
        group = self._group
        rows = len(group.entries)
        width = max(1, self.prefill_chunk // rows)
        n_new = [0 if ticket.ended else min(width, len(group.prompt(i)) - group.done[i])
                 for i, (ticket, _) in enumerate(group.entries)]
        chunk = max(n_new)
        if chunk:
            ids = torch.zeros(rows, chunk, dtype=torch.long)
            for i, n in enumerate(n_new):
                ids[i, :n] = torch.tensor(group.prompt(i)[group.done[i]:group.done[i] + n])
            logits = self.model(ids.to(self.model.device), cache=group.cache, n_new=n_new, last_only=True)
            self.metrics.prompt_tokens.inc(sum(n_new))
            events: dict[Ticket, list[Event]] = defaultdict(list)
            now = time.monotonic()
            for i, n in enumerate(n_new):
                group.done[i] += n
                if n and group.done[i] == len(group.prompt(i)):
                    self._start_choices(group, i, logits[i:i + 1], now, events)
            self._send(events)
        if group.finished:
            self._group = None

    def _start_choices(self, group: PrefillGroup, row: int, logits: torch.Tensor, now: float,
                       events: dict[Ticket, list[Event]]) -> None:
        """Prompt `row` of the group is in: its job's n choices take slots, a copy of it, and their first tokens."""
        ticket, prompt_index = group.entries[row]
        job = ticket.job
        if ticket.ended:
            return
        for j in range(job.n):
            index = prompt_index * job.n + j
            choice = Choice(ticket, index, LogitsProcessors(job.params, [group.prompt(row)], logits.shape[-1],
                                                            self.model.device),
                            self._generator(job, index), ChoiceText(self.model.tokenizer, job.stop))
            choice.slot = self._slots.acquire()
            self._slots.load(choice.slot, group.cache, row)
            ticket.reserved -= 1
            self._reserved -= 1
            self._running.append(choice)
            self._take(choice, logits.clone() if j + 1 < job.n else logits, now, events)
            if ticket.ended:  # its logits were not finite
                return

    def _start_beams(self, ticket: Ticket) -> None:
        job = ticket.job
        ticket.beams = beam_steps(self.model, job.prompts, job.params, job.num_beams, job.length_penalty,
                                  job.early_stopping, job.n)
        self._beams.append(ticket)
        self._beam_rows += job.held_rows
        self.metrics.prompt_tokens.inc(sum(len(p) for p in job.prompts))  # prefilled at its first step

    def _advance(self, ticket: Ticket) -> None:
        """One step of a beam job; at its end, its choices go to its sink."""
        try:
            next(ticket.beams)
        except StopIteration as done:
            self._finish_beams(ticket, done.value)
        except Exception as e:  # noqa: BLE001 - one bad search must not take the server down
            log.exception("a beam search step failed")
            self._fail(ticket, Failure(500, f"the model failed on this request: {type(e).__name__}: {e}"))

    def _finish_beams(self, ticket: Ticket, out: GenerateOutput) -> None:
        """A beam job's hypotheses as its choices' events, all in one batch."""
        job, now = ticket.job, time.monotonic()
        events: list[Event] = []
        for index, (tokens, logprobs) in enumerate(zip(out.sequences, out.logprobs)):
            text = ChoiceText(self.model.tokenizer, [])
            for token, logprob in zip(tokens, logprobs):
                events.append(Token(index, token, text.push(token), None if job.logprobs is None else logprob))
            reason = "stop" if tokens and tokens[-1] == job.params.eos_token_id else "length"
            events.append(Finish(index, reason, text.finish()))
            self.metrics.generated_tokens.inc(len(tokens))
        ticket.first_token_at = now
        self.metrics.time_to_first_token.observe(now - ticket.arrival)
        self._end(ticket, "done")
        self._send({ticket: events})

    def _generator(self, job: Job, index: int) -> torch.Generator | None:
        """Choice index's random stream: seeded by the job's seed + index (so choice 0 of a seeded job samples as
        `generate` with that seed), else by fresh randomness; none for greedy."""
        if not job.params.do_sample:
            return None
        seed = secrets.randbits(63) if job.params.seed is None else (job.params.seed + index) % SEED_RANGE[1]
        return torch.Generator(device=self.model.device).manual_seed(seed)

    def _decode(self) -> None:
        """One decode step over every slot; each running choice takes its next token. Greedy choices without
        penalties (see `Choice.batched_greedy`) share one argmax, and the logits are checked once for all: per-choice
        operations cost each row a few passes over the vocabulary (on CUDA, a wait for the GPU each)."""
        started = time.perf_counter()
        running = list(self._running)
        logits = self._slots.step({choice.slot: choice.next_token for choice in running})  # (rows, V)
        logits = logits[torch.tensor([choice.slot for choice in running], device=logits.device)].float()  # (R, V)
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        greedy = [i for i, choice in enumerate(running) if choice.batched_greedy and finite[i]]
        best = dict(zip(greedy, _greedy_tokens(logits[greedy], [running[i] for i in greedy]))) if greedy else {}
        events: dict[Ticket, list[Event]] = defaultdict(list)
        now = time.monotonic()
        for i, choice in enumerate(running):
            if choice.ticket.ended:
                continue
            if i in best:
                self._accept(choice, best[i], None, None, now, events)
            else:
                self._take(choice, logits[i:i + 1], now, events)
        self._send(events)
        self.metrics.batch_rows.observe(len(running))
        self.metrics.step_seconds.observe(time.perf_counter() - started)

    def _take(self, choice: Choice, logits: torch.Tensor, now: float, events: dict[Ticket, list[Event]]) -> None:
        """Choose choice's next token from its logits (1, V) through its processors and random stream."""
        ticket, params = choice.ticket, choice.ticket.job.params
        logits = logits.float()
        try:
            check_finite(logits, choice.generated, [False])
        except NonFiniteLogitsError as e:
            self._fail(ticket, Failure(500, str(e)), "error")
            return
        raw = logits.log_softmax(dim=-1) if ticket.job.logprobs is not None else None  # before the processors
        token = int(choose_next(choice.processors(logits), params, choice.generator)[0])
        self._accept(choice, token, *self._logprobs(raw, token, ticket.job), now, events)

    def _accept(self, choice: Choice, token: int, logprob: float | None, top: list[tuple[int, float]] | None,
                now: float, events: dict[Ticket, list[Event]]) -> None:
        """Choice took token: report it; end the choice where it stops."""
        ticket, params = choice.ticket, choice.ticket.job.params
        choice.processors.append([token], [0])
        choice.generated += 1
        events[ticket].append(Token(choice.index, token, choice.text.push(token), logprob, top))
        self.metrics.generated_tokens.inc()
        if ticket.first_token_at is None:
            ticket.first_token_at = now
            self.metrics.time_to_first_token.observe(now - ticket.arrival)
        elif choice.generated > 1:
            self.metrics.time_per_token.observe(now - choice.last_token_at)
        choice.last_token_at = now
        if token == params.eos_token_id or choice.text.stopped:
            self._finish(choice, "stop", events)
        elif choice.generated == params.max_new_tokens:
            self._finish(choice, "length", events)
        else:
            choice.next_token = token

    @staticmethod
    def _logprobs(raw: torch.Tensor | None, token: int, job: Job) -> tuple[float | None, list | None]:
        if raw is None:
            return None, None
        top = None
        if job.logprobs:
            values, ids = raw[0].topk(job.logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        return raw[0, token].item(), top

    def _finish(self, choice: Choice, reason: str, events: dict[Ticket, list[Event]]) -> None:
        ticket = choice.ticket
        events[ticket].append(Finish(choice.index, reason, choice.text.finish()))
        self._release(choice)
        ticket.choices_left -= 1
        if ticket.choices_left == 0:
            self._end(ticket, "done")

    def _release(self, choice: Choice) -> None:
        self._running.remove(choice)
        self._slots.release(choice.slot)

    def _end(self, ticket: Ticket, outcome: str) -> None:
        """The job is over (outcome: done, cancelled, timeout, error): free everything it holds."""
        if ticket.ended:
            return
        ticket.ended = True
        for choice in [c for c in self._running if c.ticket is ticket]:
            self._release(choice)
        self._reserved -= ticket.reserved
        ticket.reserved = 0
        if ticket in self._beams:
            self._beams.remove(ticket)
            self._beam_rows -= ticket.job.held_rows
            ticket.beams.close()  # its cache goes with it
        if ticket in self._waiting:
            self._waiting.remove(ticket)
            with self._wakeup:
                self._pending -= 1
        self.metrics.finished.labels(outcome).inc()

    def _fail(self, ticket: Ticket, failure: Failure, outcome: str = "error") -> None:
        if ticket.ended:
            return
        self._end(ticket, outcome)
        self._send({ticket: [failure]})

    def _send(self, events: dict[Ticket, list[Event]]) -> None:
        for ticket, batch in events.items():
            try:
                ticket.sink(batch)
            except Exception:  # noqa: BLE001 - a listener gone wrong ends its own job only
                log.exception("delivering events failed; cancelling the job")
                self._end(ticket, "cancelled")

    def _remap(self, moves: dict[int, int]) -> None:
        for choice in self._running:
            choice.slot = moves.get(choice.slot, choice.slot)

    def _update_gauges(self) -> None:
        m = self.metrics
        m.queue_length.set(self._pending)
        m.slots_in_use.set(self._slots.in_use)
        m.slots_reserved.set(self._reserved)
        m.cache_rows.set(self._slots.rows)
        m.beam_rows.set(self._beam_rows)


def _greedy_tokens(rows: torch.Tensor, choices: list[Choice]) -> list[int]:
    """The next token of each of choices (all `batched_greedy`) from its row of rows (G, V), a copy that is written:
    the argmax, end of text masked in the rows where min_new_tokens still bans it."""
    early = [(j, choice.ticket.job.params.eos_token_id) for j, choice in enumerate(choices) if choice.bans_end_of_text]
    if early:
        held, eos = zip(*early)
        rows[list(held), list(eos)] = float("-inf")
    return rows.argmax(dim=-1).tolist()


def _unique(tickets: list[Ticket]) -> list[Ticket]:
    """tickets without repeats, in order."""
    return list({id(t): t for t in tickets}.values())
