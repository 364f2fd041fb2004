"""What every decoding strategy shares: the ragged prefill, the logits check, the result, and the plain decode loop
(greedy or sampled, one token per row per step) that `generate` and `Chat` run over a prefilled cache.

Beam search (`gpt2.beam_search`) and speculative decoding (`gpt2.speculative`) build on the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .dispatch import DecodeFn, decode_step_for
from .kv_cache import KVCache
from .sampling import LogitsProcessors, RandomStreams, SamplingParams, choose_next

if TYPE_CHECKING:
    from .model import GPT2
    from .stop_strings import StopStrings


class NonFiniteLogitsError(RuntimeError):
    """The model's logits held NaN or inf: no token chosen from them would mean anything."""


TokenCallback = Callable[[int, int], None]  # (row, token) as each new token is chosen


@dataclass
class GenerateOutput:
    """`generate(..., return_dict=True)`: each returned sequence's new tokens, their log-probabilities and a score."""

    sequences: list[list[int]]
    logprobs: list[list[float]]  # logprobs[i][j]: log-softmax of the model's raw logits at token j of sequence i
    scores: list[float]  # beam search: transformers' length-penalised beam score; otherwise sum(logprobs[i])
    draft_acceptance: float | None = None  # with a draft model: the share of its proposed tokens the target kept
    draft_stopped_after: int | None = None  # with a draft: rounds run before drafting stopped (it did not pay), or None


def check_finite(logits: torch.Tensor, step: int, finished: list[bool]) -> None:
    """Raise NonFiniteLogitsError where a row still generating got NaN or inf logits (B, V) at this step."""
    broken = (~torch.isfinite(logits).all(dim=-1)).tolist()
    rows = [i for i, bad in enumerate(broken) if bad and not finished[i]]
    if rows:
        where = "the prompt's last token" if step == 0 else f"decode step {step}"
        raise NonFiniteLogitsError(
            f"the model's logits hold NaN or inf at {where} (row{'s' if len(rows) > 1 else ''} "
            f"{', '.join(map(str, rows))}): no token can be chosen from them. The weights hold NaN/inf, or the "
            "activations overflow this dtype (float16 ends at 65504: try torch.bfloat16 or torch.float32)")


def prefill(model: GPT2, cache: KVCache, rows: list[list[int]]) -> torch.Tensor:
    """Run the prompts (right-padded into one chunk) into the cache; logits (B, V) at each row's last token."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=model.device)  # (B, T)
    return model(ids, cache=cache, n_new=[len(r) for r in rows], last_only=True)


def prefill_shared(model: GPT2, cache: KVCache, rows: list[list[int]], owner: list[int]) -> torch.Tensor:
    """Prefill each prompt once for every cache row that continues it (row r continues prompt owner[r]: n-best
    sampling, beams, MMI candidates); logits (R, V) at each row's prompt's last token. Where each prompt has one row
    the prompts go straight into cache; else into a cache of their own length, whose rows cache then copies."""
    if owner == list(range(len(rows))):
        return prefill(model, cache, rows)
    once = model.new_cache(len(rows), max(len(r) for r in rows))
    logits = prefill(model, once, rows)  # (P, V)
    cache.take_rows(once, owner)
    return logits[torch.tensor(owner, device=logits.device)]


def continue_from_cache(model: GPT2, cache: KVCache, logits: torch.Tensor, histories: list[list[int]],
                        params: SamplingParams, on_token: TokenCallback | None = None,
                        row_generators: list[torch.Generator | None] | None = None,
                        decode: DecodeFn | None = None, stops: StopStrings | None = None,
                        with_logprobs: bool = False) -> GenerateOutput:
    """The decode loop, from a cache already holding each row's context.

    logits (B, V): the model's output at each row's last cached token; histories: each row's tokens so far
    (what repetition penalty and n-gram bans look at). A row stops after eos (included), once its text holds one of
    stops' strings, or at params.max_new_tokens. The last chosen token of a row is not fed back, so it is not in the
    cache when this returns. The caller has checked the cache has room for params.max_new_tokens - 1 more tokens per
    row. Sampling draws from one stream seeded by params.seed, or from row_generators, each row's own (see
    `choose_next`). decode runs the step over cache (default: `gpt2.dispatch.decode_step_for`). with_logprobs: the
    result's logprobs and scores are filled (else empty).
    """
    device = model.device
    batch, vocab_size = logits.shape
    generator: RandomStreams = row_generators
    if row_generators is None and params.do_sample and params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    processors = LogitsProcessors(params, histories, vocab_size, device)

    if decode is None:
        decode = decode_step_for(model, cache)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    logprobs: list[list[float]] = [[] for _ in range(batch)]
    finished = [False] * batch
    for step in range(params.max_new_tokens):
        logits = logits.float()  # (B, V)
        check_finite(logits, step, finished)
        raw = logits.log_softmax(dim=-1) if with_logprobs else None  # before the processors write into logits
        next_tokens = choose_next(processors(logits), params, generator)  # (B,)
        tokens = next_tokens.tolist()
        chosen = raw.gather(1, next_tokens[:, None])[:, 0].tolist() if raw is not None else None
        live = [i for i in range(batch) if not finished[i]]
        for i in live:
            token = tokens[i]
            outputs[i].append(token)
            if chosen is not None:
                logprobs[i].append(chosen[i])
            if on_token is not None:
                on_token(i, token)
            finished[i] = token == params.eos_token_id or (stops is not None and stops.push(i, token))
        if all(finished) or step + 1 == params.max_new_tokens:
            break
        processors.append([tokens[i] for i in live], live)
        logits = decode(next_tokens)
    scores = [sum(row) for row in logprobs] if with_logprobs else []
    return GenerateOutput(outputs, logprobs if with_logprobs else [], scores)
