"""Speculative decoding: a draft model proposes a few tokens per row, the target checks them all in one forward of
several tokens per row, and each row keeps what the target would have chosen.

A round, for every row still generating: the draft runs g decode steps from the row's last token, proposing
d_0 .. d_{g-1} (greedy: its processed argmax; sampling: a draw from its processed distribution q_j); the target
runs [last, d_0 .. d_{g-1}] in one forward, which gives its logits at every proposal and one past them. Position by
position, with the logits processors' state of the tokens kept so far, the target keeps d_j where it would choose it
(greedy: d_j is its argmax; sampling: with probability min(1, p_j(d_j) / q_j(d_j)), Leviathan et al. 2023, Chen et
al. 2023) and otherwise takes its own token (its argmax; a draw from max(0, p_j - q_j), normalised) and ends the
row's round; a row that kept all g takes a bonus token from the last position. So a greedy row is token for token
the target's greedy output, and a sampled row's tokens have the target's distribution exactly.

Each cache keeps what it holds per row (`KVCache.lengths`): rolling a row back is lowering its length, since no path
(the forward, the C step, the CUDA-graph step) reads a slot past it, and the next write overwrites it. The draft
holds one token less than the target after a row kept every proposal; that token goes in with the next round's
first draft step. g follows transformers' heuristic: +2 after a round where every row kept every proposal, else -1;
and where the backend knows how many token rows a forward takes at about a decode step's cost (on the CPU, the 16 of
the small-batch matmul), a round checks no more: at batch 8 the target checks one proposal per row, since checking
4 would cost it several decode steps' compute.

Drafting stops where it is measured not to pay (`gpt2.draft_gate`): every round and every plain target step is
timed; after a first, untimed round, 4 timed rounds and 2 plain steps, and after each round from then on, drafting
stops for the rest of the generation where the last 4 rounds took under 0.9 times the tokens per second of the
fastest plain step. A poor draft loses that way (its rounds take about one token a row for the cost of the draft's
steps and a check), and so does a good one where the check of several tokens a row costs more than it saves (batch 8
on 2 CPU cores). The rest are plain decode steps, as `gpt2.decoding` runs them, so the output is unchanged: each step,
a round or a plain step chosen from what came before, takes the target's tokens (greedy) or its distribution of them
(sampling). `GenerateOutput.draft_stopped_after` says after how many rounds drafting stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .decoding import GenerateOutput, TokenCallback, check_finite
from .draft_gate import DraftGate
from .sampling import LogitsProcessors, RandomStreams, SamplingParams, choose_next, draw, next_token_probs, uniform

if TYPE_CHECKING:
    from .dispatch import DecodeFn
    from .kv_cache import KVCache
    from .model import GPT2
    from .stop_strings import StopStrings

FIRST_DRAFT_TOKENS = 4  # g of the first round
MAX_DRAFT_TOKENS = 16


@dataclass
class Rows:
    """What each row has generated, and whether it has stopped; `take` adds a token the target chose."""

    params: SamplingParams
    processors: LogitsProcessors
    on_token: TokenCallback | None
    stops: StopStrings | None
    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]
    proposed: int = 0  # draft tokens the target checked
    accepted: int = 0  # of which it kept

    def take(self, row: int, token: int, logprob: float | None) -> bool:
        """Row takes token (with its raw log-probability where recorded); True once the row has stopped."""
        self.tokens[row].append(token)
        if logprob is not None:
            self.logprobs[row].append(logprob)
        if self.on_token is not None:
            self.on_token(row, token)
        self.processors.append([token], [row])
        self.finished[row] = (token == self.params.eos_token_id or len(self.tokens[row]) == self.params.max_new_tokens
                              or (self.stops is not None and self.stops.push(row, token)))
        return self.finished[row]

    def live(self) -> list[int]:
        return [row for row, done in enumerate(self.finished) if not done]


@dataclass
class Draft:
    """The draft model, its cache and decode step, and per row the tokens the target holds and it does not yet."""

    model: GPT2
    cache: KVCache
    decode: DecodeFn
    pending: list[list[int]] = field(default_factory=list)


def speculative_decode(model: GPT2, cache: KVCache, decode: DecodeFn, draft: Draft, logits: torch.Tensor,
                       histories: list[list[int]], params: SamplingParams, on_token: TokenCallback | None = None,
                       stops: StopStrings | None = None, with_logprobs: bool = False,
                       row_generators: list[torch.Generator | None] | None = None) -> GenerateOutput:
    """`gpt2.decoding.continue_from_cache` with a draft: both caches hold each row's history, logits (B, V) the
    target's at its last token; the result also says how many of the draft's tokens the target kept. Sampling draws
    from one stream seeded by params.seed, or from row_generators, each row's own."""
    device = model.device
    batch, vocab_size = logits.shape
    generator: RandomStreams = row_generators
    if row_generators is None and params.do_sample and params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    rows = Rows(params, LogitsProcessors(params, histories, vocab_size, device), on_token, stops,
                [[] for _ in range(batch)], [[] for _ in range(batch)], [False] * batch)
    draft.pending = [[] for _ in range(batch)]

    last = first_tokens(rows, logits, generator, with_logprobs)  # each row's token not yet in either cache
    cheap_rows = model.backend.rows_at_step_cost()
    gate = DraftGate()
    g = FIRST_DRAFT_TOKENS
    while not all(rows.finished):
        live = rows.live()
        g = min(g, MAX_DRAFT_TOKENS)
        room = min(params.max_new_tokens - len(rows.tokens[row]) for row in live) - 1  # proposals that can be kept
        if cheap_rows is not None:
            room = min(room, max(1, cheap_rows // len(live) - 1))
        held = list(cache.lengths)
        gate.begin()
        if min(g, room) == 0 or gate.plain_due():
            target_step(rows, decode, cache, draft, last, held, generator, with_logprobs)
            gate.plain_done(len(live))
            continue
        drafts, q = propose(draft, rows.processors.copy(), last, live, min(g, room), params, generator)
        kept = verify(model, cache, rows, last, drafts, q, live, params, generator, with_logprobs)
        for row in live:  # roll each cache back to the tokens kept; the draft never held its last proposal
            n = kept[row]
            cache.lengths[row] = held[row] + n
            draft.cache.lengths[row] = held[row] + min(n, len(drafts[row]))
            draft.pending[row] = drafts[row][-1:] if n > len(drafts[row]) else []
            last[row] = rows.tokens[row][-1]
        gate.round_done(sum(kept[row] for row in live))
        g = g + 2 if all(kept[row] > len(drafts[row]) for row in live) else max(1, g - 1)
    scores = [sum(row) for row in rows.logprobs] if with_logprobs else []
    acceptance = rows.accepted / rows.proposed if rows.proposed else None
    return GenerateOutput(rows.tokens, rows.logprobs if with_logprobs else [], scores, acceptance, gate.stopped_after)


def first_tokens(rows: Rows, logits: torch.Tensor, generator: RandomStreams,
                 with_logprobs: bool) -> list[int]:
    """Each row's first token, from the target's prefill logits (B, V), as the plain decode loop chooses it."""
    logits = logits.float()
    check_finite(logits, 0, rows.finished)
    raw = logits.log_softmax(dim=-1) if with_logprobs else None
    tokens = choose_next(rows.processors(logits), rows.params, generator).tolist()
    for row, token in enumerate(tokens):
        rows.take(row, token, None if raw is None else raw[row, token].item())
    return tokens


def target_step(rows: Rows, decode: DecodeFn, cache: KVCache, draft: Draft, last: list[int], held: list[int],
                generator: RandomStreams, with_logprobs: bool) -> None:
    """A round without proposals (no room left for one, or drafting does not pay): one target decode step, as the
    plain loop runs it; the draft keeps the token it missed in `Draft.pending`."""
    logits = decode(torch.tensor(last, device=cache.k.device)).float()  # (B, V)
    check_finite(logits, min(len(rows.tokens[row]) for row in rows.live()), rows.finished)
    raw = logits.log_softmax(dim=-1) if with_logprobs else None
    tokens = choose_next(rows.processors(logits), rows.params, generator).tolist()
    for row, token in enumerate(tokens):
        if rows.finished[row]:
            cache.lengths[row] = held[row]
            continue
        draft.pending[row].append(last[row])
        rows.take(row, token, None if raw is None else raw[row, token].item())
        last[row] = token


def propose(draft: Draft, processors: LogitsProcessors, last: list[int], live: list[int], g: int,
            params: SamplingParams, generator: RandomStreams) -> tuple[list[list[int]], list[torch.Tensor]]:
    """g draft tokens per row (for the rows in live; the others' are ignored), and with sampling the distribution
    (B, V) each position's were drawn from. All through the draft's decode step: it first takes what it lags behind
    the target (`Draft.pending`) and each row's last token, one decode step per token, a row with fewer to take
    feeding its last token again at the same slot (the same keys, the same logits); then its own proposals but the
    last."""
    cache, device = draft.cache, draft.cache.k.device
    frozen = list(cache.lengths)  # rows not in live keep theirs: a decode step's write past them is dropped
    going = set(live)
    feeds = [[*draft.pending[row], last[row]] if row in going else [last[row]] for row in range(len(last))]
    for i in range(max(len(f) for f in feeds)):
        for row, feed in enumerate(feeds):
            cache.lengths[row] = frozen[row] + min(i, len(feed) - 1)
        logits = draft.decode(torch.tensor([feed[min(i, len(feed) - 1)] for feed in feeds], device=device))
    idle = [row for row in range(len(last)) if row not in going]
    drafts: list[list[int]] = [[] for _ in last]
    q: list[torch.Tensor] = []
    for j in range(g):
        for row in idle:
            cache.lengths[row] = frozen[row]
        processed = processors(logits.float())  # (B, V)
        if params.do_sample:
            q.append(next_token_probs(processed, params))
            tokens = draw(q[-1], generator)
        else:
            tokens = processed.argmax(dim=-1)
        picked = tokens.tolist()
        for row in live:
            drafts[row].append(picked[row])
        processors.append([picked[row] for row in live], live)
        if j + 1 < g:
            logits = draft.decode(tokens)
    return drafts, q


def verify(model: GPT2, cache: KVCache, rows: Rows, last: list[int], drafts: list[list[int]], q: list[torch.Tensor],
           live: list[int], params: SamplingParams, generator: RandomStreams,
           with_logprobs: bool) -> list[int]:
    """The target's forward over [last, proposals] for the rows in live, and the tokens each row keeps (`Rows.take`);
    returns per row how many tokens it took this round."""
    g = len(drafts[live[0]])
    device = cache.k.device
    going = set(live)
    ids = torch.tensor([[last[row], *drafts[row]] if row in going else [0] * (g + 1) for row in range(len(last))],
                       device=device)  # (B, g + 1)
    logits = model(ids, cache=cache, n_new=[g + 1 if row in going else 0 for row in range(len(last))])  # (B, g+1, V)
    proposals = ids[:, 1:]  # (B, g)
    kept = [0] * len(last)
    checking = list(live)
    for j in range(g + 1):
        if not checking:
            break
        step_logits = logits[:, j].float()  # (B, V)
        going = set(checking)
        check_finite(step_logits, min(len(rows.tokens[row]) for row in checking),
                     [row not in going for row in range(len(last))])
        raw = step_logits.log_softmax(dim=-1) if with_logprobs else None
        processed = rows.processors(step_logits)
        if j == g:  # every proposal kept: a bonus token from the last position
            ok, replacement = [False] * len(last), choose_next(processed, params, generator).tolist()
        else:
            ok, replacement = check_proposals(processed, proposals[:, j], None if not q else q[j], params, generator)
        still = []
        for row in checking:
            token = drafts[row][j] if ok[row] else replacement[row]
            if j < g:
                rows.proposed += 1
                rows.accepted += ok[row]
            kept[row] += 1
            if not rows.take(row, token, None if raw is None else raw[row, token].item()) and ok[row]:
                still.append(row)
        checking = still
    return kept


def check_proposals(processed: torch.Tensor, proposals: torch.Tensor, q: torch.Tensor | None,
                    params: SamplingParams, generator: RandomStreams) -> tuple[list[bool], list[int]]:
    """Per row, whether the target keeps its proposal, and the token it takes instead where it does not.

    processed (B, V): the target's processed logits at the proposals; q (B, V): the distribution the proposals were
    drawn from (sampling only). Greedy keeps a proposal that is the target's argmax; sampling keeps proposal d with
    probability min(1, p(d) / q(d)) and otherwise draws from max(0, p - q) normalised, which makes the kept token's
    distribution p (Leviathan et al. 2023, Theorem 1)."""
    if not params.do_sample:
        best = processed.argmax(dim=-1)
        return (best == proposals).tolist(), best.tolist()
    p = next_token_probs(processed, params)  # (B, V)
    at = proposals[:, None]
    ratio = p.gather(1, at)[:, 0] / q.gather(1, at)[:, 0]  # q(d) > 0: d was drawn from q
    keep = uniform(len(ratio), generator, ratio.device) < ratio
    residual = (p - q).clamp(min=0.0)
    total = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(total > 0, residual / total.clamp(min=torch.finfo(p.dtype).tiny), p)  # p == q: never used
    return keep.tolist(), draw(residual, generator).tolist()
