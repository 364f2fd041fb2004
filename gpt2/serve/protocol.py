"""The OpenAI wire format of the requests this server takes, and its error bodies.

Requests are parsed strictly (a number where a string belongs is an error, not converted; NaN and infinity are not
numbers; an unknown field is refused as OpenAI refuses it), and every error becomes OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, naming the field. The engine's own sampling settings ride along under
their transformers names (top_k, repetition_penalty, no_repeat_ngram_size, min_new_tokens, num_beams, length_penalty,
early_stopping).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
UNION_FIELDS = {  # fields of several shapes: pydantic reports each shape's error, this says what fits
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
    "early_stopping": 'true, false or "never"',
}


class ApiError(Exception):
    """An error answered in OpenAI's shape: status, message, the field it concerns (param), type and code."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat completions share: OpenAI's sampling fields, and the engine's extras."""

    model_config = STRICT
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as a label for the caller's own records
    # Not supported beyond their neutral values (gpt2.serve.requests.UNSUPPORTED says so by name).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # The engine's extras, under their transformers names; None: the endpoint's default.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    min_new_tokens: int | None = Field(None, ge=0)
    num_beams: int = Field(1, ge=1)  # > 1: beam search, n its num_return_sequences
    length_penalty: float = 1.0  # beams only
    early_stopping: bool | Literal["never"] = False  # beams only


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False  # not supported beyond the neutral values, as presence_penalty
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted and ignored: DialoGPT's turns have no speakers' names

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def parse(model: type[BaseModel], body: bytes) -> Any:
    """The request model from a JSON body, or an ApiError 400 naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(error: ValidationError) -> ApiError:
    """The first of pydantic's errors as OpenAI reports it."""
    first = error.errors(include_url=False)[0]
    kind, loc, message = first["type"], first["loc"], first["msg"]
    if kind == "json_invalid":
        return ApiError(400, f"We could not parse the JSON body of your request: {message}")
    if not loc:
        return ApiError(400, f"The request body must be a JSON object: {message}")
    for i, part in enumerate(loc):
        if part in UNION_FIELDS and i + 1 < len(loc) and isinstance(loc[i + 1], str):
            param = _dotted(loc[:i + 1])
            return ApiError(400, f"Invalid type for '{param}': expected {UNION_FIELDS[part]}.", param)
    param = _dotted(loc)
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param)
    if kind == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param)
    return ApiError(400, f"Invalid value for '{param}': {message}.", param)


def _dotted(loc: tuple[str | int, ...]) -> str:
    """('messages', 1, 'content') -> 'messages[1].content'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
