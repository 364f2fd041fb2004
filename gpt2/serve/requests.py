"""From an OpenAI request to the scheduler's `Job`: prompts tokenized, or chat messages laid out in DialoGPT's turn
format and cut to fit as `gpt2.Chat` cuts them; sampling settings checked by `SamplingParams`; this server's limits
applied. Every refusal is an `ApiError` naming its field.

Defaults: a completion takes OpenAI's (16 tokens, temperature 1); a chat completion `gpt2.chat.CHAT_DEFAULTS`, the
settings DialoGPT chats with (sampled with top-k and top-p, no repeated 3-grams). temperature 0 is greedy.
num_beams > 1 is beam search, which is greedy (temperature 0 unless given; a temperature > 0 is refused): n is its
number of hypotheses returned, at most num_beams; stop strings and top log-probabilities are refused with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..chat import CHAT_DEFAULTS, DEFAULT_MAX_HISTORY_TOKENS, fit_history, format_history
from ..generation import check_token_ids
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from .job import Job
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, SamplingFields

COMPLETION_DEFAULTS: dict[str, Any] = dict(max_new_tokens=16, temperature=1.0, top_p=1.0, top_k=0,
                                           repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0)
UNSUPPORTED = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "echo": False, "suffix": None}
MAX_STOPS = 4  # as OpenAI
ENGINE_TO_API = {"max_new_tokens": "max_tokens"}  # SamplingParams' names that the API spells otherwise


@dataclass(frozen=True)
class Limits:
    max_choices: int  # prompts x n of one request: they decode side by side (the scheduler's max_batch)
    n_positions: int  # prompt + max_tokens must fit
    timeout_s: float


def completion_job(request: CompletionRequest, tokenizer: Tokenizer, limits: Limits) -> Job:
    _check_common(request)
    if request.best_of not in (None, request.n):
        raise ApiError(400, f"best_of={request.best_of} is not supported by this server (only best_of = n)",
                       "best_of")
    if request.logprobs and request.num_beams > 1:
        raise ApiError(400, f"logprobs={request.logprobs} with num_beams={request.num_beams}: beam search keeps each "
                            "token's log-probability only; ask for logprobs=0", "logprobs")
    params = _sampling(request, COMPLETION_DEFAULTS, request.max_tokens, tokenizer.eos_token_id)
    prompts = _prompts(request.prompt, tokenizer)
    for i, prompt in enumerate(prompts):
        if len(prompt) + params.max_new_tokens > limits.n_positions:
            where = f"prompt {i} has" if len(prompts) > 1 else "the prompt has"
            total = len(prompt) + params.max_new_tokens
            raise ApiError(400, f"This model's maximum context length is {limits.n_positions} tokens, but {where} "
                                f"{len(prompt)} tokens and max_tokens is {params.max_new_tokens}: {total} in all. "
                                "Shorten the prompt or lower max_tokens.", "prompt", code="context_length_exceeded")
    return _job(request, prompts, params, limits, request.logprobs)


def chat_job(request: ChatCompletionRequest, tokenizer: Tokenizer, limits: Limits) -> Job:
    """The reply to request.messages: the user's and assistant's turns in DialoGPT's format (system and developer
    messages have no place in it and are left out), the oldest dropped until they fit beside max_tokens."""
    _check_common(request)
    if request.top_logprobs is not None and not request.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if request.top_logprobs and request.num_beams > 1:
        raise ApiError(400, f"top_logprobs={request.top_logprobs} with num_beams={request.num_beams}: beam search "
                            "keeps each token's log-probability only; leave top_logprobs out", "top_logprobs")
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    params = _sampling(request, CHAT_DEFAULTS, max_tokens, tokenizer.eos_token_id)
    budget = limits.n_positions - params.max_new_tokens
    if budget < 2:
        raise ApiError(400, f"max_tokens={params.max_new_tokens} leaves no room for the conversation in this model's "
                            f"{limits.n_positions} positions", "max_tokens", code="context_length_exceeded")
    turns = []
    for i, message in enumerate(request.messages):
        if message.role in ("system", "developer"):
            continue
        if not message.text.strip():
            raise ApiError(400, f"messages[{i}] has no text: every turn needs some", f"messages[{i}].content")
        turns.append(tokenizer.encode(message.text))
    if not turns:
        raise ApiError(400, "messages holds no user or assistant turn to reply to", "messages")
    kept, _ = fit_history(turns, budget, max_tokens=DEFAULT_MAX_HISTORY_TOKENS)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return _job(request, [format_history(kept, tokenizer.eos_token_id)], params, limits, logprobs)


def _check_common(request: SamplingFields) -> None:
    for name, neutral in UNSUPPORTED.items():
        value = getattr(request, name, neutral)
        if value != neutral and value != {}:
            raise ApiError(400, f"{name}={value!r} is not supported by this server: leave it out", name)
    if request.num_beams > 1:
        if request.temperature:
            raise ApiError(400, f"temperature={request.temperature} with num_beams={request.num_beams}: beam search "
                                "is greedy here (no beam sampling); leave temperature out or set it to 0",
                           "temperature")
        if request.n > request.num_beams:
            raise ApiError(400, f"n={request.n} exceeds num_beams={request.num_beams}: beam search returns at most "
                                "num_beams hypotheses per prompt", "n")
        if request.stop:
            raise ApiError(400, f"stop with num_beams={request.num_beams} is not supported: a beam ends at end of "
                                "text or max_tokens", "stop")


def _sampling(request: SamplingFields, defaults: dict[str, Any], max_tokens: int | None, eos: int) -> SamplingParams:
    """request's settings over defaults, checked by SamplingParams; temperature 0 is greedy."""
    settings = {name: getattr(request, name) for name in ("temperature", "top_p", "top_k", "repetition_penalty",
                                                          "no_repeat_ngram_size", "min_new_tokens")}
    settings["max_new_tokens"] = max_tokens
    if request.num_beams > 1:
        settings["temperature"] = 0  # beams are greedy (a temperature > 0 is refused)
    settings = {name: defaults[name] if value is None else value for name, value in settings.items()}
    greedy = settings["temperature"] == 0
    try:
        return SamplingParams(**settings | {"temperature": 1.0 if greedy else settings["temperature"]},
                              do_sample=not greedy, eos_token_id=eos, seed=request.seed)
    except ValueError as e:
        name = str(e).split("=", 1)[0]
        api_name = ENGINE_TO_API.get(name, name)
        raise ApiError(400, api_name + str(e)[len(name):], api_name) from None


def _prompts(prompt: str | list[int] | list[str] | list[list[int]], tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids of each prompt; an empty text prompt is <|endoftext|> alone, as OpenAI's default prompt."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is an empty list: give at least one prompt", "prompt")
    prompts = []
    for i, item in enumerate(prompt):
        ids = (tokenizer.encode(item) or [tokenizer.eos_token_id]) if isinstance(item, str) else item
        if not ids:
            raise ApiError(400, f"prompt {i} is an empty list of token ids", "prompt")
        try:
            prompts.append(check_token_ids("prompt", i, ids, tokenizer.vocab_size))
        except ValueError as e:
            raise ApiError(400, str(e), "prompt") from None
    return prompts


def _job(request: SamplingFields, prompts: list[list[int]], params: SamplingParams, limits: Limits,
         logprobs: int | None) -> Job:
    """The job, once its choices and stop strings are checked against the limits."""
    beams = request.num_beams
    if beams > 1:
        if len(prompts) * beams > limits.max_choices:
            raise ApiError(400, f"{len(prompts)} prompt(s) x num_beams={beams} = {len(prompts) * beams} beams; this "
                                f"server decodes at most {limits.max_choices} rows of one request together",
                           "num_beams")
        return Job(prompts, params, request.n, [], logprobs, limits.timeout_s, beams, request.length_penalty,
                   request.early_stopping)
    if request.n > 1 and not params.do_sample:
        raise ApiError(400, f"n={request.n} with temperature 0 would return {request.n} copies of one greedy "
                            "completion: sample (temperature > 0) or ask for n=1", "n")
    if len(prompts) * request.n > limits.max_choices:
        raise ApiError(400, f"{len(prompts)} prompt(s) x n={request.n} = {len(prompts) * request.n} choices; this "
                            f"server decodes at most {limits.max_choices} choices of one request together", "n")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOPS or any(not s for s in stop):
        raise ApiError(400, f"stop takes up to {MAX_STOPS} non-empty strings", "stop")
    return Job(prompts, params, request.n, stop, logprobs, limits.timeout_s)
