"""`generate`: every decoding strategy behind one call, its parameters checked before any work.

Autoregressive generation over the KV cache: one ragged prefill, then one-token decode steps (`gpt2.decoding`). Rows
of different lengths are right-padded in the prefill and each row keeps its own positions, so in fp32 every row
generates exactly what it would alone (bf16 and int8 logits may differ by rounding with the batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .beam_search import EarlyStopping, Steps, beam_search_steps, run_steps
from .decoding import GenerateOutput, TokenCallback, continue_from_cache, prefill_shared
from .dispatch import generation_cache
from .sampling import SamplingParams
from .speculative import Draft, speculative_decode
from .stop_strings import StopStrings, check_stop_strings

if TYPE_CHECKING:
    from .model import GPT2


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
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    stop_strings: str | Sequence[str] | None = None,
    draft_model: GPT2 | None = None,
    return_dict: bool = False,
) -> list[list[int]] | GenerateOutput:
    """The new tokens of each returned sequence; a sequence stops after eos (included), once its text contains one of
    stop_strings (decoded with model.tokenizer; the token completing it included), or at max_new_tokens.

    num_beams > 1: beam search, as transformers' (length_penalty, early_stopping True, False or "never"), returning
    each prompt's num_return_sequences best hypotheses. num_return_sequences: sequences per prompt, prompt-major (with
    do_sample: k samples continuing one prefill of the prompt). on_token(i, token) streams each token of sequence i
    as it is chosen (not with beams, which choose their sequences at the end). draft_model: speculative decoding
    (`gpt2.speculative`) with another loaded model of the same vocabulary proposing tokens; the output is the one
    without it (greedy: token for token; sampling: in distribution). return_dict: a `GenerateOutput` instead, with
    each token's log-probability and each sequence's score.
    """
    params = SamplingParams(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
                            no_repeat_ngram_size, min_new_tokens, eos_token_id, seed)
    vocab_size = model.config.vocab_size
    if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id={eos_token_id} is outside the vocabulary [0, {vocab_size})")
    if not isinstance(return_dict, bool):
        raise ValueError(f"return_dict={return_dict!r} must be True or False")
    check_count("num_return_sequences", num_return_sequences)
    check_beam_settings(num_beams, length_penalty, early_stopping, num_return_sequences, params, stop_strings,
                        on_token)
    rows = validate_prompts(prompts, vocab_size)
    check_lengths(model, rows, max_new_tokens)
    if draft_model is not None:
        check_draft(model, draft_model, num_beams)
        check_lengths(draft_model, rows, max_new_tokens, "the draft model")
    length = max(len(r) for r in rows) + max_new_tokens
    if num_beams > 1:
        out = run_steps(beam_steps(model, rows, params, num_beams, length_penalty, early_stopping,
                                   num_return_sequences))
        return out if return_dict else out.sequences
    owner = [i for i in range(len(rows)) for _ in range(num_return_sequences)]  # sequence -> its prompt
    stops = stop_watcher(model, stop_strings, len(owner))
    histories = [rows[i] for i in owner]
    if draft_model is not None:
        with (generation_cache(model, len(owner), length) as (cache, decode),
              generation_cache(draft_model, len(owner), length) as (draft_cache, draft_decode)):
            logits = prefill_shared(model, cache, rows, owner)
            prefill_shared(draft_model, draft_cache, rows, owner)
            out = speculative_decode(model, cache, decode, Draft(draft_model, draft_cache, draft_decode), logits,
                                     histories, params, on_token, stops, with_logprobs=return_dict)
        return out if return_dict else out.sequences
    with generation_cache(model, len(owner), length) as (cache, decode):
        logits = prefill_shared(model, cache, rows, owner)
        out = continue_from_cache(model, cache, logits, histories, params, on_token, decode=decode, stops=stops,
                                  with_logprobs=return_dict)
    return out if return_dict else out.sequences


def beam_steps(model: GPT2, rows: list[list[int]], params: SamplingParams, num_beams: int, length_penalty: float,
               early_stopping: EarlyStopping, num_return_sequences: int) -> Steps[GenerateOutput]:
    """`generate`'s beam search over checked rows, one model call per step (the prefill, then each decode step), for a
    caller that interleaves it with other work (`gpt2.serve.scheduler`); closing it early frees its cache."""
    owner = [i for i in range(len(rows)) for _ in range(num_beams)]  # beam -> its prompt
    length = max(len(r) for r in rows) + params.max_new_tokens
    with generation_cache(model, len(owner), length) as (cache, decode):
        logits = prefill_shared(model, cache, rows, owner)
        yield
        return (yield from beam_search_steps(model, cache, logits, rows, params, decode, num_beams, length_penalty,
                                             early_stopping, num_return_sequences))


def check_draft(model: GPT2, draft_model: GPT2, num_beams: int) -> None:
    """A draft must be a loaded model on the target's device with its vocabulary, and not combined with beams."""
    if not hasattr(draft_model, "config") or not callable(getattr(draft_model, "generate", None)):
        raise ValueError(f"draft_model must be a loaded model (gpt2.load), got {type(draft_model).__name__}")
    if draft_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"draft_model has a vocabulary of {draft_model.config.vocab_size} tokens, the model "
                         f"{model.config.vocab_size}: the draft must share the model's vocabulary")
    if draft_model.device != model.device:
        raise ValueError(f"draft_model is on {draft_model.device}, the model on {model.device}: put both on one device")
    if num_beams > 1:
        raise ValueError(f"draft_model with num_beams={num_beams} is not supported: speculative decoding runs greedy "
                         "or sampled decoding")


def check_beam_settings(num_beams: int, length_penalty: float, early_stopping: bool | str, num_return_sequences: int,
                        params: SamplingParams, stop_strings: str | Sequence[str] | None,
                        on_token: TokenCallback | None) -> None:
    """Refuse beam settings that are malformed or that this engine's beam search does not combine, by name."""
    check_count("num_beams", num_beams)
    if not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool) or not math.isfinite(
            length_penalty):
        raise ValueError(f"length_penalty={length_penalty!r} must be a finite number")
    if early_stopping not in (True, False, "never") or not isinstance(early_stopping, (bool, str)):
        raise ValueError(f"early_stopping={early_stopping!r} must be True, False or \"never\"")
    if num_beams == 1:
        if num_return_sequences > 1 and not params.do_sample:
            raise ValueError(f"num_return_sequences={num_return_sequences} needs do_sample=True (n-best sampling) or "
                             "num_beams >= num_return_sequences (beam search): greedy decoding would return copies")
        return
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} exceeds num_beams={num_beams}: beam search "
                         "returns at most num_beams hypotheses per prompt")
    if params.do_sample:
        raise ValueError(f"num_beams={num_beams} with do_sample=True (beam sampling) is not supported: beam search "
                         "here is deterministic; use num_return_sequences with do_sample for several samples")
    if stop_strings:
        raise ValueError(f"stop_strings with num_beams={num_beams} is not supported: a beam ends at eos or "
                         "max_new_tokens")
    if on_token is not None:
        raise ValueError(f"on_token with num_beams={num_beams}: beam search chooses its sequences only at the end, "
                         "so there is nothing to stream")


def check_count(name: str, value: object) -> None:
    """value must be a positive integer, else a ValueError naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def check_lengths(model: GPT2, rows: list[list[int]], max_new_tokens: int, which: str = "the model") -> None:
    """Each prompt with max_new_tokens must fit the model's n_positions."""
    n_positions = model.config.n_positions
    for i, row in enumerate(rows):
        if len(row) + max_new_tokens > n_positions:
            raise ValueError(f"prompt {i}: {len(row)} tokens + max_new_tokens {max_new_tokens} = "
                             f"{len(row) + max_new_tokens} exceeds {which}'s n_positions ({n_positions})")


def stop_watcher(model: GPT2, stop_strings: str | Sequence[str] | None, rows: int) -> StopStrings | None:
    """The watcher of stop_strings over rows, decoding with model.tokenizer; None for no stop strings."""
    strings = check_stop_strings(stop_strings)
    if not strings:
        return None
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("stop_strings needs the model's tokenizer to decode the text: load the model with gpt2.load(), "
                         "or set model.tokenizer = gpt2.Tokenizer.default()")
    return StopStrings(tokenizer, strings, rows)
