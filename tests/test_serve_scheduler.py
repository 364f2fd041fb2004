"""The continuous-batching scheduler in-process (no HTTP): greedy choices equal `generate` alone whatever runs beside
them, on each decode path; seeded sampling, stop strings, cancellation, timeouts, the queue bound, a failing step;
beam jobs equal to `generate`'s beams, running beside the batch, cancelled, counted against max_batch; and the slots
growing and shrinking through their row buckets.
"""

from __future__ import annotations

import inspect
import random
import threading
import time

import pytest
import torch

pytest.importorskip("prometheus_client", reason="the serve extra is not installed: pip install -e '.[serve]'")

import gpt2.serve.slots  # noqa: E402
from gpt2 import GPT2, GPT2Config  # noqa: E402
from gpt2.cuda.decode_graph import StaticDecodeStep  # noqa: E402
from gpt2.sampling import SamplingParams  # noqa: E402
from gpt2.serve.job import Failure, Finish, Job, Token  # noqa: E402
from gpt2.serve.metrics import ServeMetrics  # noqa: E402
from gpt2.serve.scheduler import QueueFull, Scheduler  # noqa: E402
from gpt2.serve.slots import SlotCache  # noqa: E402
from gpt2.tokenizer import Tokenizer  # noqa: E402
from tests.decode_paths import use_path  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128)
WAIT_S = 60  # a bound on waiting for a job, never reached unless something hangs


@pytest.fixture(scope="module")
def model() -> GPT2:
    torch.manual_seed(0)
    model = GPT2(CONFIG).eval()
    model.tokenizer = Tokenizer.default()
    return model


class Collector:
    """A job's sink: its tokens and finish reasons per choice, its failure, and an event once it is over."""

    def __init__(self, job: Job) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(job.rows)]
        self.logprobs: list[list[float | None]] = [[] for _ in range(job.rows)]
        self.texts: list[str] = [""] * job.rows
        self.reasons: list[str | None] = [None] * job.rows
        self.failure: Failure | None = None
        self.over = threading.Event()
        self.first_token = threading.Event()

    def __call__(self, events: list) -> None:
        for event in events:
            if isinstance(event, Token):
                self.tokens[event.choice].append(event.token)
                self.logprobs[event.choice].append(event.logprob)
                self.texts[event.choice] += event.text
                self.first_token.set()
            elif isinstance(event, Finish):
                self.texts[event.choice] += event.text
                self.reasons[event.choice] = event.reason
            else:
                self.failure = event
        if self.failure is not None or all(self.reasons):
            self.over.set()

    def wait(self) -> Collector:
        assert self.over.wait(WAIT_S), "the job never ended"
        return self


def run(scheduler: Scheduler, job: Job) -> Collector:
    collector = Collector(job)
    scheduler.submit(job, collector)
    return collector


@pytest.fixture
def scheduler(model):
    """A running scheduler of 16 rows whose prefill takes 8 tokens a turn (so prompts are cut into chunks)."""
    scheduler = Scheduler(model, ServeMetrics(), max_batch=16, max_queue=64, prefill_chunk=8)
    scheduler.start()
    yield scheduler
    scheduler.stop()


def mixed_requests(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(50000) for _ in range(rng.randrange(1, 60))], rng.randrange(1, 40)) for _ in range(n)]


@pytest.mark.parametrize("path", ["c-step", "forward", "static"])
def test_greedy_choices_equal_generate_alone_under_sixteen_concurrent_jobs(model, path, monkeypatch):
    """16 jobs of mixed prompt and output lengths arrive at random moments: each greedy choice is token for token
    what `generate` gives its prompt alone. "static" runs the CUDA path's step (all max_batch rows, every step over
    the whole cache) eagerly, as `gpt2.dispatch` runs it under a CUDA graph."""
    requests = mixed_requests(16, seed=1)
    expected = [model.generate([prompt], max_new_tokens=n)[0] for prompt, n in requests]
    steps = use_path("forward" if path == "static" else path, monkeypatch)
    if path == "static":
        monkeypatch.setattr(gpt2.serve.slots, "cuda_graphs_enabled", lambda model: True)
        monkeypatch.setattr(gpt2.serve.slots, "decode_step_for",
                            lambda model, cache: StaticDecodeStep(model, cache, use_graph=False))
    scheduler = Scheduler(model, ServeMetrics(), max_batch=16, prefill_chunk=8)
    scheduler.start()
    try:
        rng = random.Random(2)
        collectors = []
        for prompt, n in requests:
            collectors.append(run(scheduler, Job([prompt], SamplingParams(max_new_tokens=n))))
            time.sleep(rng.random() * 0.005)  # arrivals spread over running decode steps
        got = [c.wait().tokens[0] for c in collectors]
    finally:
        scheduler.stop()
    assert got == expected
    if path != "static":
        assert steps[path] > 0 and sum(steps.values()) == steps[path]
    registry = scheduler.metrics.registry  # rows decoded per step, on average more than one: they were batched
    assert registry.get_sample_value("gpt2_decode_batch_rows_sum") > registry.get_sample_value(
        "gpt2_decode_batch_rows_count")


def test_greedy_min_new_tokens_holds_end_of_text_back_as_generate_does(scheduler, model):
    """Greedy choices under min_new_tokens share the batch's argmax with end of text masked while it is too early:
    with end of text set to the token greedy picks at step 3, each choice equals `generate`'s, beside a choice that
    may stop there."""
    prompts = [[464, 3290, 318, 257], [40, 588, 257, 1310, 12, 99]]
    eos = model.generate([prompts[0]], max_new_tokens=3, eos_token_id=None)[0][2]
    jobs = [(prompt, min_new) for prompt in prompts for min_new in (0, 6)]
    collectors = [run(scheduler, Job([prompt], SamplingParams(max_new_tokens=10, min_new_tokens=min_new,
                                                              eos_token_id=eos))) for prompt, min_new in jobs]
    got = [c.wait().tokens[0] for c in collectors]
    expected = [model.generate([prompt], max_new_tokens=10, min_new_tokens=min_new, eos_token_id=eos)[0]
                for prompt, min_new in jobs]
    assert got == expected
    assert len(got[0]) <= 3 and len(got[1]) >= 6  # end of text ended one early and was held back in the other


def test_seeded_sampling_is_generates_and_reproducible(scheduler, model):
    """Choice 0 of a seeded job samples as `generate` with that seed; choice i uses seed + i; rerunning repeats."""
    prompt = [464, 3290, 318, 257]
    params = SamplingParams(max_new_tokens=12, do_sample=True, top_k=40, top_p=0.9, temperature=0.8, seed=7,
                            eos_token_id=None)
    first = run(scheduler, Job([prompt], params, n=3)).wait().tokens
    again = run(scheduler, Job([prompt], params, n=3)).wait().tokens
    assert first == again
    for i in range(3):
        alone = model.generate([prompt], max_new_tokens=12, do_sample=True, top_k=40, top_p=0.9, temperature=0.8,
                               seed=7 + i, eos_token_id=None)[0]
        assert first[i] == alone


def test_several_prompts_with_n_choices_each(scheduler, model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
    params = SamplingParams(max_new_tokens=5, do_sample=True, seed=3, eos_token_id=None)
    got = run(scheduler, Job(prompts, params, n=2)).wait()
    for choice in range(4):
        prompt = prompts[choice // 2]
        assert got.tokens[choice] == model.generate([prompt], max_new_tokens=5, do_sample=True, seed=3 + choice,
                                                    eos_token_id=None)[0]
    assert got.reasons == ["length"] * 4


def test_a_stop_string_ends_the_choice_and_its_text_stops_before_it(scheduler, model):
    prompt = [40, 588, 257, 1310]
    tokens = model.generate([prompt], max_new_tokens=20, eos_token_id=None)[0]
    text = model.tokenizer.decode(tokens)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    got = run(scheduler, Job([prompt], SamplingParams(max_new_tokens=20, eos_token_id=None), stop=[stop])).wait()
    assert got.reasons == ["stop"]
    assert got.texts[0] == text[:text.index(stop)]
    assert stop in model.tokenizer.decode(got.tokens[0])  # the choice ran to the token completing it, no further
    assert stop not in model.tokenizer.decode(got.tokens[0][:-1])


def test_logprobs_are_the_raw_logits_log_softmax(scheduler, model):
    prompt = [464, 3290, 318]
    events = []
    job = Job([prompt], SamplingParams(max_new_tokens=3, repetition_penalty=1.5), logprobs=2)
    collector = Collector(job)
    scheduler.submit(job, lambda batch: (events.extend(batch), collector(batch)))
    collector.wait()
    tokens = [e for e in events if isinstance(e, Token)]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + [t.token for t in tokens[:-1]]]))[0, len(prompt) - 1:]
    expected = logits.log_softmax(-1)
    for i, token in enumerate(tokens):
        assert token.logprob == pytest.approx(expected[i, token.token].item(), abs=1e-4)
        assert [t for t, _ in token.top] == expected[i].topk(2).indices.tolist()


def test_cancelling_frees_the_slots_at_the_next_step(model):
    """A job cancelled at its first token (from its sink, so at a known step) ends there: its 4 slots are free."""
    scheduler = Scheduler(model, ServeMetrics(), max_batch=16)
    job = Job([[1, 2, 3]], SamplingParams(max_new_tokens=120, do_sample=True, eos_token_id=None), n=4)
    collector = Collector(job)

    def cancel_at_first_token(events):
        collector(events)
        ticket.cancel()

    ticket = scheduler.submit(job, cancel_at_first_token)
    scheduler.start()  # after the ticket is known to the sink
    try:
        registry = scheduler.metrics.registry
        wait_until(lambda: registry.get_sample_value("gpt2_jobs_finished_total", {"outcome": "cancelled"}) == 1)
        wait_until(lambda: registry.get_sample_value("gpt2_slots_in_use") == 0)
    finally:
        scheduler.stop()
    assert all(len(tokens) <= 2 for tokens in collector.tokens)  # the first token, at most one more step's
    assert not collector.over.is_set()


def wait_until(condition, bound_s: float = WAIT_S) -> None:
    """Poll condition until it holds (the scheduler's thread gets there at its next turn)."""
    end = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < end, "the condition never held"
        time.sleep(0.005)


def test_a_job_past_its_timeout_fails_with_504(scheduler):
    got = run(scheduler, Job([[1, 2, 3]], SamplingParams(max_new_tokens=5), timeout_s=0.0)).wait()
    assert got.failure is not None and got.failure.status == 504 and "timed out" in got.failure.message


def test_the_queue_is_bounded(model):
    scheduler = Scheduler(model, ServeMetrics(), max_batch=2, max_queue=3)  # not started: nothing leaves the queue
    job = Job([[1, 2]], SamplingParams(max_new_tokens=2))
    for _ in range(3):
        scheduler.submit(job, lambda events: None)
    with pytest.raises(QueueFull, match="3 requests are waiting"):
        scheduler.submit(job, lambda events: None)


def test_a_failing_step_fails_its_jobs_only_and_the_scheduler_goes_on(scheduler, monkeypatch):
    real = SlotCache.step
    calls = []

    def failing_once(self, tokens):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(self, tokens)

    monkeypatch.setattr(SlotCache, "step", failing_once)
    broken = run(scheduler, Job([[1, 2, 3]], SamplingParams(max_new_tokens=5))).wait()
    assert broken.failure is not None and broken.failure.status == 500 and "injected" in broken.failure.message
    fine = run(scheduler, Job([[1, 2, 3]], SamplingParams(max_new_tokens=5))).wait()
    assert fine.failure is None and fine.reasons == ["length"]
    assert scheduler._slots.in_use == 0


def test_slots_grow_through_buckets_and_shrink_back(model):
    """Growing takes one copy to the bucket that holds what is reserved; shrinking waits until a quarter-size bucket
    has held the slots in use for SHRINK_AFTER steps in a row."""
    with torch.inference_mode():
        slots = SlotCache(model, 16)
        assert slots.buckets == [1, 2, 4, 8, 16] and slots.rows == 1
        source = model.new_cache(1, 10)
        model(torch.tensor([[5, 6, 7, 8]]), cache=source)
        slots.reserve(5)
        assert slots.rows == 8
        taken = [slots.acquire() for _ in range(5)]
        assert taken == [0, 1, 2, 3, 4] and slots.rows == 8
        slots.load(4, source, 0)
        for slot in range(4):
            slots.release(slot)
        for _ in range(gpt2.serve.slots.SHRINK_AFTER - 1):
            assert slots.shrink() == {} and slots.rows == 8
        taken = [slots.acquire(), slots.acquire()]  # 3 in use: no quarter-size bucket holds them, the count restarts
        assert slots.shrink() == {} and slots.sparse_steps == 0
        for slot in taken:
            slots.release(slot)
        moves = {}
        for _ in range(gpt2.serve.slots.SHRINK_AFTER):
            moves = slots.shrink() or moves
        assert moves == {4: 0} and slots.rows == 1  # one slot in use fits a bucket of 1
        assert slots.cache.lengths == [4]
        assert torch.equal(slots.cache.k[:, 0, :, :4], source.k[:, 0, :, :4])
        slots.release(0)
        assert slots.in_use == 0


def beam_job(prompt: list[int], max_new: int, **settings) -> Job:
    params = SamplingParams(max_new_tokens=max_new, eos_token_id=settings.pop("eos_token_id", 50256),
                            no_repeat_ngram_size=settings.pop("no_repeat_ngram_size", 0))
    return Job([prompt], params, **settings)


def test_a_beam_job_equals_generates_beams_beside_greedy_jobs_that_finish_first(model):
    """A long beam job beside 8 short greedy ones, all admitted at the first turn: it returns `generate`'s
    hypotheses (and logprobs), they theirs alone, and they finish while it still runs (it advances a step a turn,
    121 turns in all, not stalling the batch)."""
    prompt = [464, 3290, 318, 257, 1310]
    settings = dict(num_beams=4, length_penalty=0.7, early_stopping="never")
    expected = model.generate([prompt], max_new_tokens=120, eos_token_id=None, no_repeat_ngram_size=2,
                              num_return_sequences=3, return_dict=True, **settings)
    requests = mixed_requests(8, seed=3)
    greedy_expected = [model.generate([p], max_new_tokens=min(n, 10))[0] for p, n in requests]
    scheduler = Scheduler(model, ServeMetrics(), max_batch=16, prefill_chunk=64)
    beams = run(scheduler, beam_job(prompt, 120, eos_token_id=None, no_repeat_ngram_size=2, n=3, logprobs=0,
                                    **settings))
    greedy = [run(scheduler, Job([p], SamplingParams(max_new_tokens=min(n, 10)))) for p, n in requests]
    scheduler.start()
    try:
        got = [c.wait().tokens[0] for c in greedy]
        assert not beams.over.is_set()  # the batch went on beside it
        assert scheduler.metrics.registry.get_sample_value("gpt2_beam_rows") == 4
        beams.wait()
    finally:
        scheduler.stop()
    assert got == greedy_expected
    assert beams.tokens == expected.sequences and beams.reasons == ["length"] * 3
    for got_logprobs, logprobs in zip(beams.logprobs, expected.logprobs):
        assert got_logprobs == pytest.approx(logprobs)
    assert beams.texts == [model.tokenizer.decode(t, skip_special_tokens=True) for t in expected.sequences]


def test_beam_jobs_end_at_end_of_text_as_generate(scheduler, model):
    prompt = [40, 588, 257, 1310]
    eos = model.generate([prompt], max_new_tokens=4, num_beams=3, eos_token_id=None)[0][3]
    expected = model.generate([prompt], max_new_tokens=12, num_beams=3, num_return_sequences=2, eos_token_id=eos,
                              early_stopping=True)
    got = run(scheduler, beam_job(prompt, 12, eos_token_id=eos, n=2, num_beams=3, early_stopping=True)).wait()
    assert got.tokens == expected
    assert got.reasons == ["stop" if t[-1] == eos else "length" for t in expected] and "stop" in got.reasons


def test_cancelling_a_beam_job_closes_its_search_at_its_next_step(model):
    """Cancelled (from a greedy job's sink, so at a known turn), the beam job ends there, before its end, and its
    search is closed: its cache is gone and its rows are free."""
    scheduler = Scheduler(model, ServeMetrics(), max_batch=16)
    beams = run(scheduler, beam_job([1, 2, 3], 120, eos_token_id=None, num_beams=4))
    beam_ticket = scheduler._inbox[-1]
    greedy_job = Job([[4, 5]], SamplingParams(max_new_tokens=3))
    greedy = Collector(greedy_job)
    scheduler.submit(greedy_job, lambda events: (greedy(events), beam_ticket.cancel()))
    scheduler.start()
    try:
        registry = scheduler.metrics.registry
        wait_until(lambda: registry.get_sample_value("gpt2_jobs_finished_total", {"outcome": "cancelled"}) == 1)
        wait_until(lambda: registry.get_sample_value("gpt2_beam_rows") == 0)
        greedy.wait()
    finally:
        scheduler.stop()
    assert inspect.getgeneratorstate(beam_ticket.beams) == inspect.GEN_CLOSED
    assert not beams.over.is_set() and scheduler._beams == []


def test_beams_count_against_max_batch(model):
    """A beam job of 4 beams fills a 4-row scheduler: the greedy job behind it starts once the beams have ended."""
    scheduler = Scheduler(model, ServeMetrics(), max_batch=4)
    beams = run(scheduler, beam_job([1, 2, 3], 20, eos_token_id=None, num_beams=4))
    greedy = run(scheduler, Job([[4, 5]], SamplingParams(max_new_tokens=2)))
    scheduler.start()
    try:
        greedy.wait()
    finally:
        scheduler.stop()
    assert beams.over.is_set() and beams.reasons == ["length"]
