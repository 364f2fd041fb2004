"""Log-likelihood of continuations given contexts: ragged pairs scored in one batched forward.

The building block of MMI reranking (`gpt2.mmi`), n-best ranking and perplexity. Each pair is laid out
as context + continuation, right-padded into one (B, T) batch; a causal forward never lets padding
reach the real positions. Only the positions that predict a continuation token go through the output
layer, in chunks, so memory stays bounded by the chunk, not by batch x length x vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .decoding import NonFiniteLogitsError
from .generation import check_token_ids

if TYPE_CHECKING:
    from .model import GPT2

PROJECT_CHUNK = 512  # continuation positions projected onto the vocabulary at a time


@torch.inference_mode()
def score(model: GPT2, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[float]:
    """log P(continuation | context) for each pair, summed over the continuation's tokens (natural log).

    contexts and continuations are parallel lists of token-id lists. A context must hold at least one
    token (to score text from its start, give [eos] as the context, as GPT-2 was trained); an empty
    continuation scores 0.0. Each pair's total length must fit the model's n_positions.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations: pass one context per continuation")
    vocab_size, n_positions = model.config.vocab_size, model.config.n_positions
    pairs = []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        ctx, cont = check_token_ids("context", i, ctx, vocab_size), check_token_ids("continuation", i, cont, vocab_size)
        if not ctx:
            raise ValueError(f"context {i} is empty: the first continuation token needs something to be predicted "
                             "from (use [eos] as the context to score from the start of a text)")
        if len(ctx) + len(cont) > n_positions:
            raise ValueError(f"pair {i}: context {len(ctx)} + continuation {len(cont)} tokens exceed the model's "
                             f"n_positions ({n_positions})")
        pairs.append((ctx, cont))
    totals = [0.0] * len(pairs)
    scored = [i for i, (_, cont) in enumerate(pairs) if cont]
    if not scored:
        return totals

    device = model.device
    rows = [pairs[i][0] + pairs[i][1] for i in scored]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)  # (B, T)
    hidden = model(ids, hidden_only=True)  # (B, T, C)

    # Position t predicts token t + 1: continuation tokens are predicted from [len(ctx) - 1, len(ctx) + len(cont) - 1).
    batch_rows, positions, targets = [], [], []
    for b, i in enumerate(scored):
        ctx, cont = pairs[i]
        batch_rows += [b] * len(cont)
        positions += range(len(ctx) - 1, len(ctx) + len(cont) - 1)
        targets += cont
    batch_rows_t = torch.tensor(batch_rows, device=device)  # (N,)
    targets_t = torch.tensor(targets, device=device)  # (N,)
    states = hidden[batch_rows_t, torch.tensor(positions, device=device)]  # (N, C)
    token_logprobs = torch.empty(len(targets), dtype=torch.float32, device=device)  # (N,)
    for start in range(0, len(targets), PROJECT_CHUNK):
        end = start + PROJECT_CHUNK
        logits = model.project(states[start:end]).float()  # (n, V)
        token_logprobs[start:end] = logits.log_softmax(dim=-1).gather(1, targets_t[start:end, None])[:, 0]
    sums = torch.zeros(len(scored), dtype=torch.float64, device=device)
    sums.index_add_(0, batch_rows_t, token_logprobs.double())  # (B,)
    for i, total in zip(scored, sums.tolist()):
        if math.isnan(total):
            raise NonFiniteLogitsError(f"pair {i}: the model's logits hold NaN or inf, so its log-likelihood is NaN "
                                       "(the weights hold NaN/inf, or the activations overflow this dtype)")
        totals[i] = total
    return totals
