"""Beam search with the beams as rows of the batch, token-identical to transformers' `generate(num_beams=...)`.

Each prompt's num_beams beams are consecutive rows of one cache, prefilled once (`gpt2.decoding.prefill_shared`).
A step scores every beam's continuations (the log-softmax of its logits, processed as transformers processes it,
plus the beam's running score), keeps each prompt's best 2 x num_beams, moves the best num_beams that did not just end
into the rows for the next step and files the ones that ended among the prompt's best hypotheses, with the length
penalty. The KV cache follows the beams in place (`KVCache.reorder_rows`): a row continuing its own beam copies
nothing, a row taking another beam's place copies that beam's slots from the first token where the two beams differ
(the prompt and the tokens they share are already there), so a step copies the few slots where beams diverged, not
whole rows.

The bookkeeping is transformers' `_beam_search`, tensor for tensor (its `_get_top_k_continuations`,
`_get_running_beams_for_next_iteration`, `_update_finished_beams`, `_check_early_stop_heuristic`), so that the same
logits give the same beams and scores; its names are kept where they help to compare the two. Every prompt runs the
same number of steps, so a ragged batch gives each prompt the beams it gets alone.

`beam_search_steps` is the search as a generator that pauses after each decode step, so that a caller can interleave
it with other work (the server advances a beam job by one step per scheduler turn); `beam_search` runs it through.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, TypeVar

import torch

from .decoding import GenerateOutput, check_finite
from .sampling import LogitsProcessors, SamplingParams

if TYPE_CHECKING:
    from .dispatch import DecodeFn
    from .kv_cache import KVCache
    from .model import GPT2

EarlyStopping = bool | str  # True, False or "never", as transformers takes it
NEG = -1.0e9  # transformers' score for a slot that must not be chosen
T = TypeVar("T")
Steps = Generator[None, None, T]  # one model call per step; the result is the generator's return value


def beam_search(model: GPT2, cache: KVCache, logits: torch.Tensor, prompts: list[list[int]], params: SamplingParams,
                decode: DecodeFn, num_beams: int, length_penalty: float, early_stopping: EarlyStopping,
                num_return_sequences: int) -> GenerateOutput:
    """Beam search from a cache whose rows p * num_beams ... (p + 1) * num_beams - 1 each hold prompt p, logits
    (P * num_beams, V) at its last token; num_return_sequences best hypotheses per prompt, prompt-major."""
    return run_steps(beam_search_steps(model, cache, logits, prompts, params, decode, num_beams, length_penalty,
                                       early_stopping, num_return_sequences))


def run_steps(steps: Steps[T]) -> T:
    """Run a step generator to its end; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def beam_search_steps(model: GPT2, cache: KVCache, logits: torch.Tensor, prompts: list[list[int]],
                      params: SamplingParams, decode: DecodeFn, num_beams: int, length_penalty: float,
                      early_stopping: EarlyStopping, num_return_sequences: int) -> Steps[GenerateOutput]:
    """`beam_search`, pausing (yielding) after each decode step."""
    P, nb, N = len(prompts), num_beams, params.max_new_tokens
    device = logits.device
    vocab_size = logits.shape[-1]
    beams_to_keep = 2 * nb  # transformers' max(2, 1 + number of eos ids) * num_beams, for one eos id or none
    top_num_beam_mask = torch.arange(beams_to_keep, device=device) < nb  # (2nb,)
    processors = LogitsProcessors(params, [p for p in prompts for _ in range(nb)], vocab_size, device)

    running_tokens = torch.zeros(P, nb, N, dtype=torch.long, device=device)
    running_logprobs = torch.zeros(P, nb, N, device=device)  # log-softmax of the raw logits at each token
    running_scores = torch.zeros(P, nb, device=device)
    running_scores[:, 1:] = NEG  # only the first beam's continuations compete at the first step (all beams alike)
    finished_tokens, finished_logprobs = running_tokens.clone(), running_logprobs.clone()
    finished_scores = torch.full((P, nb), NEG, device=device)
    finished_lengths = torch.zeros(P, nb, dtype=torch.long, device=device)
    is_finished = torch.zeros(P, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(P, 1, dtype=torch.bool, device=device)  # transformers' is_early_stop_heuristic_unsatisfied
    beam_offsets = torch.arange(P, device=device)[:, None] * nb  # (P, 1): each prompt's first row
    prompt_lengths = torch.tensor([len(p) for p in prompts for _ in range(nb)], device=device)  # (P*nb,)

    for step in range(N):
        logits = logits.float()  # (P*nb, V)
        check_finite(logits, step, [False] * (P * nb))
        raw = logits.log_softmax(dim=-1)
        log_probs = processors(raw.clone()).view(P, nb, vocab_size) + running_scores[:, :, None]
        log_probs = log_probs.view(P, nb * vocab_size)

        # c. each prompt's best 2nb continuations over all its beams
        topk_log_probs, topk_indices = torch.topk(log_probs, k=beams_to_keep)  # (P, 2nb) each
        topk_beams, topk_ids = topk_indices // vocab_size, topk_indices % vocab_size
        topk_tokens = gather_beams(running_tokens, topk_beams)  # (P, 2nb, N)
        topk_tokens[:, :, step] = topk_ids
        topk_logprobs = gather_beams(running_logprobs, topk_beams)
        topk_logprobs[:, :, step] = raw.view(P, nb * vocab_size).gather(1, topk_indices)

        # d. which continuations end here: eos, or the last step (transformers' stopping criteria)
        hits = topk_ids == params.eos_token_id if params.eos_token_id is not None else torch.zeros_like(topk_ids,
                                                                                                       dtype=torch.bool)
        if step + 1 >= N:
            hits = torch.ones_like(hits)

        # e. the best nb that go on
        topk_running_log_probs = topk_log_probs + hits.to(torch.float32) * NEG
        next_topk = torch.topk(topk_running_log_probs, k=nb)[1]  # (P, nb)
        held_tokens = running_tokens[:, :, :step].reshape(P * nb, step)  # what each row's cache holds past the prompt
        running_tokens = gather_beams(topk_tokens, next_topk)
        running_logprobs = gather_beams(topk_logprobs, next_topk)
        running_scores = gather_beams(topk_running_log_probs, next_topk)
        parents = (gather_beams(topk_beams, next_topk) + beam_offsets).view(-1).tolist()  # each row's previous row

        # f. the ended ones among the best hypotheses, with the length penalty
        just_finished = hits & top_num_beam_mask[None, :]
        candidates = topk_log_probs / ((step + 1) ** length_penalty)
        full = torch.all(is_finished, dim=-1, keepdim=True) & (early_stopping is True)
        candidates += full.to(torch.float32) * NEG
        candidates += (~improvable).to(torch.float32) * NEG
        candidates += (~just_finished) * NEG
        merged = torch.topk(torch.cat((finished_scores, candidates), dim=1), k=nb)[1]  # (P, nb) of 3nb
        finished_scores = gather_beams(torch.cat((finished_scores, candidates), dim=1), merged)
        finished_tokens = gather_beams(torch.cat((finished_tokens, topk_tokens), dim=1), merged)
        finished_logprobs = gather_beams(torch.cat((finished_logprobs, topk_logprobs), dim=1), merged)
        finished_lengths = gather_beams(torch.cat((finished_lengths, torch.full_like(topk_ids, step + 1)), dim=1),
                                        merged)
        is_finished = gather_beams(torch.cat((is_finished, just_finished), dim=1), merged)

        # g. stop, or move the rows to their beams and run the next step
        improvable = early_stop_heuristic(improvable, running_scores, finished_scores, is_finished, step + 1, N,
                                          early_stopping, length_penalty)
        open_beam = not (bool(is_finished.all()) and early_stopping is True)
        if not (bool(improvable.any()) and open_beam and not bool(hits.all())):
            break
        cache.reorder_rows(parents, shared_slots(held_tokens, running_tokens[:, :, :step].reshape(P * nb, step),
                                                 prompt_lengths))
        processors.reorder(parents)
        tokens = running_tokens[:, :, step].reshape(-1)  # (P*nb,)
        processors.append(tokens.tolist(), list(range(P * nb)))
        logits = decode(tokens)
        yield

    k = num_return_sequences
    lengths = finished_lengths[:, :k].reshape(-1).tolist()
    tokens = finished_tokens[:, :k].reshape(P * k, N).tolist()
    logprobs = finished_logprobs[:, :k].reshape(P * k, N).tolist()
    return GenerateOutput([row[:n] for row, n in zip(tokens, lengths)], [row[:n] for row, n in zip(logprobs, lengths)],
                          finished_scores[:, :k].reshape(-1).tolist())


def shared_slots(held: torch.Tensor, wanted: torch.Tensor, prompt_lengths: torch.Tensor) -> list[int]:
    """Per row, the leading cache slots that already hold what its new beam needs: the prompt, then the tokens up to
    the first where held (R, n), the tokens its cache holds past the prompt, and wanted (R, n), its new beam's, differ."""
    if held.shape[1] == 0:  # the first step: every row holds its prompt alone
        return prompt_lengths.tolist()
    differ = held != wanted  # (R, n)
    common = torch.where(differ.any(dim=1), differ.to(torch.uint8).argmax(dim=1), held.shape[1])  # (R,)
    return (prompt_lengths + common).tolist()


def gather_beams(tensor: torch.Tensor, beams: torch.Tensor) -> torch.Tensor:
    """tensor (P, beams, ...) at beams (P, n) -> (P, n, ...)."""
    index = beams.view(*beams.shape, *[1] * (tensor.dim() - 2))
    return torch.take_along_dim(tensor, index, dim=1)


def early_stop_heuristic(improvable: torch.Tensor, running_scores: torch.Tensor, finished_scores: torch.Tensor,
                         is_finished: torch.Tensor, generated: int, max_new_tokens: int,
                         early_stopping: EarlyStopping, length_penalty: float) -> torch.Tensor:
    """(P, 1): whether a prompt's running beams may still beat its worst finished hypothesis (transformers'
    `_check_early_stop_heuristic`; generated: the running beams' tokens)."""
    best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0.0 else generated
    best_running = running_scores[:, :1] / (best_length ** length_penalty)
    worst_finished = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], NEG)
    return improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
