"""Autoregressive generation over the KV cache: one ragged prefill, then one-token decode steps.

Rows of different lengths are right-padded in the prefill and each row keeps its own positions, so in fp32
every row generates exactly what it would alone (bf16 and int8 logits may differ by rounding with the batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from .dispatch import DecodeFn, decode_step_for, generation_cache
from .kv_cache import KVCache
from .sampling import NGramBans, RandomStreams, SamplingParams, apply_repetition_penalty, choose_next

if TYPE_CHECKING:
    from .model import GPT2


class NonFiniteLogitsError(RuntimeError):
    """The model's logits held NaN or inf: no token chosen from them would mean anything."""


TokenCallback = Callable[[int, int], None]  # (row, token) as each new token is chosen


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


def check_token_ids(kind: str, index: int, ids: Sequence[int], vocab_size: int) -> list[int]:
    """ids as a list, checked: a sequence (not text) of ints each inside [0, vocab_size); errors name kind + index."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"{kind} {index} must be a list of token ids (encode text with model.tokenizer.encode), "
                         f"got {type(ids).__name__}")
    ids = list(ids)
    for j, token in enumerate(ids):
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
            raise ValueError(f"{kind} {index}: token id {token!r} at index {j} is outside the vocabulary "
                             f"[0, {vocab_size})")
    return ids


def validate_prompts(prompts: Sequence[Sequence[int]] | torch.Tensor, vocab_size: int) -> list[list[int]]:
    """Prompts as lists of ints, checked: at least one row, no empty row, every id inside the vocabulary."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"prompts tensor must be a (batch, length) integer tensor, got {tuple(prompts.shape)} "
                             f"{prompts.dtype}")
        prompts = prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError("prompts must be a list of token-id lists (encode text with model.tokenizer.encode first)")
    rows = [check_token_ids("prompt", i, row, vocab_size) for i, row in enumerate(prompts)]
    if not rows:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
    return rows


def prefill(model: GPT2, cache: KVCache, rows: list[list[int]]) -> torch.Tensor:
    """Run the prompts (right-padded into one chunk) into the cache; logits (B, V) at each row's last token."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=model.device)  # (B, T)
    return model(ids, cache=cache, n_new=[len(r) for r in rows], last_only=True)


@torch.inference_mode()
def generate(
    model: GPT2,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_new_tokens: int = 0,
    eos_token_id: int | None = 50256,
    seed: int | None = None,
    on_token: TokenCallback | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt; a row stops after eos (included) or at max_new_tokens."""
    params = SamplingParams(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
                            no_repeat_ngram_size, min_new_tokens, eos_token_id, seed)
    vocab_size, n_positions = model.config.vocab_size, model.config.n_positions
    if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id={eos_token_id} is outside the vocabulary [0, {vocab_size})")
    rows = validate_prompts(prompts, vocab_size)
    for i, row in enumerate(rows):
        if len(row) + max_new_tokens > n_positions:
            raise ValueError(f"prompt {i}: {len(row)} tokens + max_new_tokens {max_new_tokens} = "
                             f"{len(row) + max_new_tokens} exceeds the model's n_positions ({n_positions})")
    with generation_cache(model, len(rows), max(len(r) for r in rows) + max_new_tokens) as (cache, decode):
        logits = prefill(model, cache, rows)
        return continue_from_cache(model, cache, logits, rows, params, on_token, decode=decode)


def continue_from_cache(model: GPT2, cache: KVCache, logits: torch.Tensor, histories: list[list[int]],
                        params: SamplingParams, on_token: TokenCallback | None = None,
                        row_generators: list[torch.Generator | None] | None = None,
                        decode: DecodeFn | None = None) -> list[list[int]]:
    """The decode loop, from a cache already holding each row's context.

    logits (B, V): the model's output at each row's last cached token; histories: each row's tokens so far
    (what repetition penalty and n-gram bans look at). The last chosen token of a row is not fed back,
    so it is not in the cache when this returns. The caller has checked the cache has room for
    params.max_new_tokens - 1 more tokens per row. Sampling draws from one stream seeded by params.seed,
    or from row_generators, each row's own (see `choose_next`). decode runs the step over cache (default:
    `gpt2.dispatch.decode_step_for`).
    """
    device = model.device
    batch, vocab_size = logits.shape
    eos_token_id = params.eos_token_id
    generator: RandomStreams = row_generators
    if row_generators is None and params.do_sample and params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)  # (B, V)
        for i, row in enumerate(histories):
            seen[i, row] = True
    bans = NGramBans(params.no_repeat_ngram_size, histories) if params.no_repeat_ngram_size > 0 else None

    if decode is None:
        decode = decode_step_for(model, cache)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    for step in range(params.max_new_tokens):
        logits = logits.float()  # (B, V)
        check_finite(logits, step, finished)
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        if bans is not None:
            for i in range(batch):
                banned = bans.banned(i)
                if banned:
                    logits[i, banned] = float("-inf")
        if step < params.min_new_tokens and eos_token_id is not None:
            logits[:, eos_token_id] = float("-inf")
        next_tokens = choose_next(logits, params, generator)  # (B,)
        for i, token in enumerate(next_tokens.tolist()):
            if finished[i]:
                continue
            outputs[i].append(token)
            if on_token is not None:
                on_token(i, token)
            finished[i] = token == eos_token_id
            if bans is not None:
                bans.append(i, token)
        if all(finished) or step + 1 == params.max_new_tokens:
            break
        if seen is not None:
            seen[torch.arange(batch, device=device), next_tokens] = True
        logits = decode(next_tokens)
    return outputs
