"""Response bodies in OpenAI's format, from a job's events: the chunks that stream a reply, and the whole reply.

Completions (`text_completion`) and chat completions (`chat.completion`, streamed as `chat.completion.chunk` with the
role in each choice's first delta) differ in shape only; each choice's text, tokens and log-probabilities are kept
alike. A stream sends a choice's tokens of one batch of events in one chunk: a token per chunk as the batch decodes,
a beam job's whole text at once.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from ..tokenizer import Tokenizer
from .job import Event, Finish, Job, Token

Kind = Literal["completion", "chat"]


class Reply:
    """One response to a job: its id, the events gathered per choice, and the bodies OpenAI's clients expect."""

    def __init__(self, kind: Kind, model_id: str, job: Job, tokenizer: Tokenizer) -> None:
        self.kind = kind
        self.model_id = model_id
        self.job = job
        self.tokenizer = tokenizer
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        rows = job.rows
        self.texts: list[list[str]] = [[] for _ in range(rows)]
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.logprobs: list[list[dict[str, Any]]] = [[] for _ in range(rows)]  # this kind's entries, per token
        self.text_offsets = [0] * rows  # completions' logprobs: where each token's text starts
        self.finish_reasons: list[str | None] = [None] * rows

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.job.prompts)
        completion = sum(len(t) for t in self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunks(self, events: list[Event]) -> list[dict[str, Any]]:
        """Record events (Token, Finish); the stream chunks that carry them: one per run of a choice's tokens (its
        text empty while a character is incomplete) and one per finish."""
        chunks = []
        i = 0
        while i < len(events):
            event = events[i]
            i += 1
            if isinstance(event, Token):
                run = [event]
                while i < len(events) and isinstance(events[i], Token) and events[i].choice == event.choice:
                    run.append(events[i])
                    i += 1
                first = not self.tokens[event.choice]
                entries = [entry for entry in map(self._record, run) if entry is not None]
                logprobs = self._logprobs(entries) if entries else None
                chunks.append(self._chunk(event.choice, "".join(t.text for t in run), logprobs, None, first))
            elif isinstance(event, Finish):
                self.texts[event.choice].append(event.text)
                self.finish_reasons[event.choice] = event.reason
                chunks.append(self._chunk(event.choice, event.text, None, event.reason, False))
        return chunks

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk of a stream whose client asked for usage (stream_options.include_usage)."""
        return {**self._head(chunk=True), "choices": [], "usage": self.usage()}

    def body(self) -> dict[str, Any]:
        """The whole response, once every choice has finished."""
        choices = []
        for i, reason in enumerate(self.finish_reasons):
            text = "".join(self.texts[i])
            logprobs = self._logprobs(self.logprobs[i]) if self.job.logprobs is not None else None
            if self.kind == "completion":
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason})
            else:
                choices.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                                "logprobs": logprobs, "finish_reason": reason})
        return {**self._head(chunk=False), "choices": choices, "usage": self.usage()}

    def _record(self, token: Token) -> dict[str, Any] | None:
        """Keep token's text, id and log-probability entry; the entry, or None."""
        i = token.choice
        self.texts[i].append(token.text)
        self.tokens[i].append(token.token)
        if token.logprob is None:
            return None
        entry = self._entry(i, token)
        self.logprobs[i].append(entry)
        return entry

    def _entry(self, i: int, token: Token) -> dict[str, Any]:
        text = self.tokenizer.decode([token.token])
        if self.kind == "completion":
            entry = {"token": text, "logprob": token.logprob, "offset": self.text_offsets[i],
                     "top": {self.tokenizer.decode([t]): lp for t, lp in token.top or []}}
            self.text_offsets[i] += len(text)
            return entry
        return {"token": text, "logprob": token.logprob, "bytes": list(self.tokenizer.decode_bytes([token.token])),
                "top_logprobs": [{"token": self.tokenizer.decode([t]), "logprob": lp,
                                  "bytes": list(self.tokenizer.decode_bytes([t]))} for t, lp in token.top or []]}

    def _logprobs(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """Entries in OpenAI's shape: the completions API's parallel lists, or chat's list of tokens."""
        if self.kind == "chat":
            return {"content": entries, "refusal": None}
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries] if self.job.logprobs else None,
                "text_offset": [e["offset"] for e in entries]}

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = "text_completion" if self.kind == "completion" else (
            "chat.completion.chunk" if chunk else "chat.completion")
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}
        return head if self.kind == "completion" else {**head, "system_fingerprint": None}

    def _chunk(self, choice: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None,
               first: bool) -> dict[str, Any]:
        if self.kind == "completion":
            body = {"index": choice, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else (
                {} if finish_reason is not None and not text else {"content": text})
            body = {"index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head(chunk=True), "choices": [body]}
