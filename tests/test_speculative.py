"""Speculative decoding (`generate(..., draft_model=...)`): greedy output token for token the target's alone, on every
decode path and with any draft; sampled output in the target's distribution (a chi-square test on a tiny vocabulary);
drafting stops where it does not pay (`gpt2.draft_gate`), timed on a simulated clock.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter

import pytest
import torch
import torch.nn as nn

from gpt2 import GPT2, GPT2Config, draft_gate, speculative
from gpt2.bench import random_model
from gpt2.cpu.int8_linear import quantize_int8
from gpt2.decoding import GenerateOutput
from gpt2.sampling import SamplingParams, draw, next_token_probs
from gpt2.tokenizer import Tokenizer
from tests.decode_paths import PATHS, use_path

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=96)
PROMPTS = [[464, 3290, 318, 257, 1310], [40], [15496, 11, 703], [257, 1310, 11, 290]]
N_NEW = 24


@pytest.fixture(scope="module")
def target() -> GPT2:
    model = random_model(CONFIG, seed=0)
    model.tokenizer = Tokenizer.default()
    return model


@pytest.fixture(scope="module")
def drafts(target) -> dict[str, GPT2]:
    """An int8 copy (agrees almost always), another random model (almost never), a smaller model (sometimes)."""
    return {"int8": quantize_int8(copy.deepcopy(target)), "other": random_model(CONFIG, seed=1),
            "smaller": random_model(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64), seed=2)}


GREEDY_SETTINGS = [dict(eos_token_id=None), dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3),
                   dict(eos_token_id=None, max_new_tokens=7)]


@pytest.mark.parametrize("which", ["int8", "other", "smaller"])
@pytest.mark.parametrize("settings", GREEDY_SETTINGS, ids=["plain", "processors", "short"])
def test_greedy_output_is_the_targets_token_for_token(target, drafts, which, settings):
    settings = {"max_new_tokens": N_NEW, **settings}
    alone = target.generate(PROMPTS, return_dict=True, **settings)
    drafted = target.generate(PROMPTS, draft_model=drafts[which], return_dict=True, **settings)
    assert drafted.sequences == alone.sequences
    for got, expected in zip(drafted.logprobs, alone.logprobs):  # the same tokens' log-probs, up to rounding
        assert got == pytest.approx(expected, abs=1e-4)
    assert 0.0 <= drafted.draft_acceptance <= 1.0
    if which == "int8":
        assert drafted.draft_acceptance > 0.9


@pytest.mark.parametrize("path", PATHS)
def test_greedy_speculation_on_every_decode_path(target, drafts, path, monkeypatch):
    expected = target.generate(PROMPTS, max_new_tokens=N_NEW, eos_token_id=None)
    steps = use_path(path, monkeypatch)
    for which in ("int8", "other"):
        assert target.generate(PROMPTS, max_new_tokens=N_NEW, eos_token_id=None, draft_model=drafts[which]) == expected
    assert steps[path] > 0


def test_a_perfect_draft_lets_the_target_check_many_tokens_per_forward(target, monkeypatch):
    """The number of proposals grows after rounds where every row kept every one (+2 each), so a draft that is a copy
    of the target needs few target forwards."""
    forwards = []
    real = GPT2.forward

    def counted(self, input_ids, *args, **kwargs):
        if self is target and input_ids.shape[1] > 1:
            forwards.append(input_ids.shape[1])
        return real(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(GPT2, "forward", counted)
    out = target.generate(PROMPTS[:1], max_new_tokens=40, eos_token_id=None, draft_model=copy.deepcopy(target),
                          return_dict=True)
    assert out.draft_acceptance == 1.0
    assert forwards[1:4] == [5, 7, 9]  # after the prefill: 4 proposals + the last token, then 6, 8
    assert len(forwards) <= 6


def test_stop_strings_eos_and_streaming_with_a_draft(target, drafts):
    free = target.generate(PROMPTS, max_new_tokens=N_NEW, eos_token_id=None)
    eos = free[0][5]
    stop = target.tokenizer.decode(free[2][3:5])
    streamed: list[tuple[int, int]] = []
    kwargs = dict(max_new_tokens=N_NEW, eos_token_id=eos, stop_strings=[stop])
    expected = target.generate(PROMPTS, **kwargs)
    got = target.generate(PROMPTS, draft_model=drafts["int8"], on_token=lambda r, t: streamed.append((r, t)), **kwargs)
    assert got == expected and len(got[0]) <= 6 and len(got[2]) < N_NEW
    assert [[t for r, t in streamed if r == row] for row in range(len(PROMPTS))] == got


def test_n_best_sampling_with_a_draft_shares_the_prefill(target, drafts):
    out = target.generate(PROMPTS[:2], max_new_tokens=8, do_sample=True, num_return_sequences=3, seed=3,
                          draft_model=drafts["int8"], return_dict=True)
    assert len(out.sequences) == 6 and all(len(s) == 8 for s in out.sequences)
    assert out.scores == pytest.approx([sum(lp) for lp in out.logprobs])


# --- drafting stops where it does not pay ---------------------------------------------------------------------------

def simulated_clock(monkeypatch, draft_step_s: float, check_s: float, plain_s: float) -> Counter:
    """The gate's clock as a cost model: each proposal costs draft_step_s, each check of proposals check_s, each plain
    target step plain_s. Returns a count of the rounds ("rounds") and plain steps ("plain") run."""
    now, calls = [0.0], Counter()
    real_propose, real_verify, real_step = speculative.propose, speculative.verify, speculative.target_step

    def propose(draft, processors, last, live, g, *args):
        calls["rounds"] += 1
        now[0] += g * draft_step_s
        return real_propose(draft, processors, last, live, g, *args)

    def verify(*args):
        now[0] += check_s
        return real_verify(*args)

    def target_step(*args):
        calls["plain"] += 1
        now[0] += plain_s
        return real_step(*args)

    monkeypatch.setattr(draft_gate, "clock", lambda: now[0])
    monkeypatch.setattr(speculative, "propose", propose)
    monkeypatch.setattr(speculative, "verify", verify)
    monkeypatch.setattr(speculative, "target_step", target_step)
    return calls


LONG = {"max_new_tokens": 64, "eos_token_id": None}  # room for the warm-up round, the timed rounds and the probes
DECIDED = draft_gate.WARMUP_ROUNDS + draft_gate.WINDOW  # the rounds run when the gate first decides


def test_drafting_stops_where_rounds_cost_more_than_they_gain(target, drafts, monkeypatch):
    """A draft the target keeps almost every proposal of, but whose rounds (2 s a proposal, 2 s the check) cost more
    than the tokens they gain at plain steps of 1 s (like batch 8 on 2 cores): the rest are plain steps, and the
    output is the target's."""
    alone = target.generate(PROMPTS, **LONG)
    calls = simulated_clock(monkeypatch, draft_step_s=2.0, check_s=2.0, plain_s=1.0)
    out = target.generate(PROMPTS, draft_model=drafts["int8"], return_dict=True, **LONG)
    assert out.sequences == alone
    assert out.draft_stopped_after == DECIDED and calls["rounds"] == DECIDED
    assert out.draft_acceptance > 0.9


@pytest.mark.parametrize(("which", "draft_step_s"), [("int8", 0.25), ("other", 1.0)])
def test_drafting_goes_on_where_it_pays_and_stops_for_a_poor_draft(target, drafts, which, draft_step_s, monkeypatch):
    """A check costs a plain step, a proposal what its draft's size suggests. The int8 copy's rounds gain several tokens
    a row and it drafts to the end; another random model of the target's size gains about one a row (most rows keep
    no proposal), at twice a plain step's cost or more, and it stops as soon as the gate decides."""
    alone = target.generate(PROMPTS, **LONG)
    calls = simulated_clock(monkeypatch, draft_step_s=draft_step_s, check_s=1.0, plain_s=1.0)
    out = target.generate(PROMPTS, draft_model=drafts[which], return_dict=True, **LONG)
    assert out.sequences == alone
    if which == "int8":
        assert out.draft_stopped_after is None and calls["rounds"] > DECIDED
    else:
        assert out.draft_acceptance < 0.5
        assert out.draft_stopped_after == DECIDED and calls["rounds"] == DECIDED


def test_one_slow_round_does_not_stop_a_draft_that_pays(monkeypatch):
    """A hiccup: one timed round lasting 3 s among rounds of 1 s gaining 4 tokens, plain steps of 1 s a token. The
    window (4 rounds, 16 tokens in 6 s) still pays; only a window of slow rounds stops drafting."""
    now = [0.0]
    monkeypatch.setattr(draft_gate, "clock", lambda: now[0])
    gate = draft_gate.DraftGate()

    def run(seconds: float, tokens: int, plain: bool = False) -> None:
        gate.begin()
        now[0] += seconds
        if plain:
            gate.plain_done(tokens)
        else:
            gate.round_done(tokens)

    for seconds in (9.0, 3.0, 1.0, 1.0, 1.0):  # the first, untimed, warms the draft's step
        assert not gate.plain_due()
        run(seconds, 4)
    assert gate.plain_due()
    run(1.0, 1, plain=True)
    run(1.0, 1, plain=True)
    assert not gate.plain_due() and gate.stopped_after is None
    for _ in range(4):
        run(5.0, 4)
    assert gate.plain_due() and gate.stopped_after == 9  # the last 4 rounds: 4 tokens in 5 s each, under 0.9 a second


# --- the distribution of sampled output -----------------------------------------------------------------------------

VOCAB = 5
TINY = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
SAMPLING = SamplingParams(max_new_tokens=4, do_sample=True, temperature=0.9, top_k=4, eos_token_id=None)
DRAWS = 40_000
P_VALUE = 1e-3


def peaked_model(seed: int) -> GPT2:
    """A random model whose next-token distributions over 5 tokens are far from uniform and depend on the context: its
    own lm_head (untied, so that it does not favour repeating the input) of a larger scale, and larger embeddings."""
    model = random_model(TINY, seed=seed)
    model.lm_head = nn.Linear(TINY.n_embd, VOCAB, bias=False)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        model.lm_head.weight.copy_(0.3 * torch.randn(VOCAB, TINY.n_embd, generator=g))
        model.wte.weight.copy_(torch.randn(VOCAB, TINY.n_embd, generator=g))
    return model.eval()


def exact_joint(model: GPT2, prompt: list[int]) -> torch.Tensor:
    """P(t1 .. t4 | prompt) under SAMPLING's temperature and top-k, every one of the 5**4 sequences, (5, 5, 5, 5)."""
    prefixes = torch.tensor(list(itertools.product(range(VOCAB), repeat=3)))  # (125, 3)
    ids = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes], dim=1)
    with torch.inference_mode():
        logits = model(ids)[:, len(prompt) - 1:]  # (125, 4, V): the distributions of t1 .. t4
    probs = next_token_probs(logits.reshape(-1, VOCAB), SAMPLING).view(len(prefixes), 4, VOCAB).double()
    joint = torch.zeros(VOCAB, VOCAB, VOCAB, VOCAB, dtype=torch.float64)
    for i, (a, b, c) in enumerate(prefixes.tolist()):
        joint[a, b, c] = probs[i, 0, a] * probs[i, 1, b] * probs[i, 2, c] * probs[i, 3]
    return joint


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test of counts against expected counts, cells expecting fewer than 5 pooled into one."""
    counts, expected = counts.flatten().double(), expected.flatten()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    wanted = torch.cat([expected[~small], expected[small].sum()[None]])
    wanted, observed = wanted[wanted > 0], observed[wanted > 0]
    statistic = ((observed - wanted) ** 2 / wanted).sum()
    dof = torch.tensor(len(wanted) - 1, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, statistic / 2).item()


def sampled_joint_p_value(target: GPT2, draft: GPT2, prompt: list[int]) -> tuple[GenerateOutput, float]:
    """(DRAWS drafted samples, the chi-square p-value of their counts against the target's exact joint)."""
    out = target.generate([prompt], num_return_sequences=DRAWS, draft_model=draft, seed=0, return_dict=True,
                          **{k: v for k, v in vars(SAMPLING).items() if k != "seed"})
    counts = torch.zeros(VOCAB ** 4, dtype=torch.float64)
    index = torch.tensor(out.sequences) @ torch.tensor([VOCAB ** 3, VOCAB ** 2, VOCAB, 1])
    counts.index_add_(0, index, torch.ones(DRAWS, dtype=torch.float64))
    return out, chi_square_p_value(counts, DRAWS * exact_joint(target, prompt))


def test_sampled_output_has_the_targets_distribution(monkeypatch):
    """40000 sampled sequences of 4 tokens from a 5-token vocabulary (625 outcomes), drafted by another model, against
    the target's exact joint distribution: Pearson's chi-square. A correct sampler fails a seeded run with probability
    P_VALUE (0.1%); the seed is fixed, so the test is deterministic. The first round proposes 2 tokens (room for 3
    after the first), so rounds of several proposals, replacements and bonus tokens all shape the joint.

    The test has power: the draft's own distribution (what keeping every proposal gives) is rejected at p < 1e-12,
    and so is a subtle mistake, drawing a rejected proposal's replacement from p instead of max(0, p - q)."""
    target, draft = peaked_model(0), peaked_model(1)
    out, p_value = sampled_joint_p_value(target, draft, [1, 2])
    assert 0.05 < out.draft_acceptance < 0.95  # both keeping and replacing proposals are exercised
    assert p_value > P_VALUE
    assert chi_square_p_value(DRAWS * exact_joint(draft, [1, 2]), DRAWS * exact_joint(target, [1, 2])) < 1e-12

    real = speculative.check_proposals

    def replacement_from_p(processed, proposals, q, params, generator):
        keep, _ = real(processed, proposals, q, params, generator)
        p = next_token_probs(processed, params)
        return keep, draw(p, generator).tolist()

    monkeypatch.setattr(speculative, "check_proposals", replacement_from_p)
    assert sampled_joint_p_value(target, draft, [1, 2])[1] < 1e-12


def test_sampled_output_keeps_the_targets_distribution_once_drafting_stops(monkeypatch):
    """As above, with a gate that decides after one round (timed) and one plain step, and rounds that look slow: each
    sequence is drafted for its first tokens and stepped plainly for the rest, and the joint is still the target's."""
    monkeypatch.setattr(draft_gate, "WARMUP_ROUNDS", 0)
    monkeypatch.setattr(draft_gate, "WINDOW", 1)
    monkeypatch.setattr(draft_gate, "PLAIN_PROBES", 1)
    simulated_clock(monkeypatch, draft_step_s=10.0, check_s=10.0, plain_s=1.0)
    out, p_value = sampled_joint_p_value(peaked_model(0), peaked_model(1), [1, 2])
    assert out.draft_stopped_after == 1
    assert p_value > P_VALUE


# --- bad combinations -----------------------------------------------------------------------------------------------

def test_bad_drafts_are_refused_by_name(target):
    other_vocab = random_model(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=1000), seed=0)
    with pytest.raises(ValueError, match="draft_model has a vocabulary of 1000 tokens"):
        target.generate(PROMPTS, draft_model=other_vocab)
    with pytest.raises(ValueError, match="draft_model with num_beams=2"):
        target.generate(PROMPTS, draft_model=copy.deepcopy(target), num_beams=2)
    short = random_model(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16), seed=0)
    with pytest.raises(ValueError, match=r"prompt 0: 5 tokens \+ max_new_tokens 12 = 17 exceeds the draft model's "
                                         r"n_positions \(16\)"):
        target.generate(PROMPTS, draft_model=short, max_new_tokens=12)
    with pytest.raises(ValueError, match="draft_model must be a loaded model"):
        target.generate(PROMPTS, draft_model="microsoft/DialoGPT-small")
