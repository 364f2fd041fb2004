"""The ASGI app (Starlette): OpenAI's completion, chat and model endpoints over a `Scheduler`, /health and /metrics.

Each generation request becomes a `Job` (`gpt2.serve.requests`) whose events come back from the scheduler's thread
onto the event loop through an asyncio queue. A streamed reply is Server-Sent Events in OpenAI's chunk format, one
chunk per token (a beam job's: each choice's whole text at the end), ending with `data: [DONE]`. A client that goes
away, streaming or not, cancels its job: its slots are free at the scheduler's next step. With an API key, every
endpoint but /health wants `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..tokenizer import Tokenizer
from .job import Event, Failure
from .metrics import ServeMetrics
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, error_body, parse
from .requests import Limits, chat_job, completion_job
from .responses import Kind, Reply
from .scheduler import QueueFull, Scheduler, SchedulerClosed

OPEN_PATHS = ("/health",)  # answered without the API key: load balancers probe it
RETRY_AFTER_S = 1  # what a 429 tells the client to wait
MAX_BODY_BYTES = 4 * 2**20  # a 1024-token context is a few KiB of text; a long chat history is cut to fit anyway


@dataclass(frozen=True)
class ServerConfig:
    model_id: str  # the one model this server serves, as requests name it
    limits: Limits
    api_key: str | None = None


class Events:
    """A job's events on the event loop: the scheduler's thread puts each batch, the request's task awaits them."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue()

    def put(self, events: list[Event]) -> None:
        """The job's sink (scheduler thread); raises RuntimeError once the loop is closed, which cancels the job."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, events)

    async def next(self) -> list[Event]:
        """The next batch; a failure in it is raised as an ApiError."""
        batch = await self.queue.get()
        failure = next((e for e in batch if isinstance(e, Failure)), None)
        if failure is not None:
            kind = "timeout" if failure.status == 504 else "server_error"
            raise ApiError(failure.status, failure.message, type=kind)
        return batch


def create_app(scheduler: Scheduler, tokenizer: Tokenizer, config: ServerConfig, metrics: ServeMetrics) -> ASGIApp:
    """The app; its lifespan starts the scheduler's thread and, once the server has drained, stops it."""
    started = int(time.time())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "queue_length": scheduler.queue_length})

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request) -> Response:
        check_model(request.path_params["model"])
        return JSONResponse(model_card())

    def model_card() -> dict[str, Any]:
        return {"id": config.model_id, "object": "model", "created": started, "owned_by": "dialogpt-engine"}

    def check_model(name: str) -> None:
        if name != config.model_id:
            raise ApiError(404, f"The model '{name}' does not exist: this server serves '{config.model_id}'",
                           "model", code="model_not_found")

    async def metrics_text(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    async def generate(request: Request, kind: Kind) -> Response:
        body = await read_body(request)
        if kind == "completion":
            parsed = parse(CompletionRequest, body)
            check_model(parsed.model)
            job = completion_job(parsed, tokenizer, config.limits)
        else:
            parsed = parse(ChatCompletionRequest, body)
            check_model(parsed.model)
            job = chat_job(parsed, tokenizer, config.limits)
        events = Events()
        try:
            ticket = scheduler.submit(job, events.put)
        except QueueFull as e:
            raise ApiError(429, f"The server is busy: {e}. Retry in a moment.", type="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except SchedulerClosed as e:
            raise ApiError(503, f"{e}: send the request to another replica", type="server_error") from None
        reply = Reply(kind, config.model_id, job, tokenizer)
        if parsed.stream:
            usage = parsed.stream_options is not None and parsed.stream_options.include_usage
            return StreamingResponse(stream(reply, events, ticket.cancel, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await whole(request, reply, events)
        finally:
            if not reply.done:  # the client went away, or the job failed
                ticket.cancel()

    routes = [
        Route("/health", health),
        Route("/metrics", metrics_text),
        Route("/v1/models", list_models),
        Route("/v1/models/{model:path}", get_model),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        ApiError: api_error, HTTPException: http_error, Exception: internal_error})
    known = {route.path for route in routes}
    return CountRequests(RequireApiKey(app, config.api_key), metrics, known)


async def read_body(request: Request) -> bytes:
    """The request's body, refused with 413 past MAX_BODY_BYTES (before it is all in memory)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"The request body is over {MAX_BODY_BYTES // 2**20} MiB: no prompt or conversation "
                                "this model can read is that long")
    return bytes(body)


async def whole(request: Request, reply: Reply, events: Events) -> Response:
    """The whole reply once every choice is done, or nothing if the client disconnects first."""
    gone = asyncio.ensure_future(disconnected(request))
    try:
        while not reply.done:
            batch = asyncio.ensure_future(events.next())
            await asyncio.wait({batch, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not batch.done():
                batch.cancel()
                return Response(status_code=499)  # nobody reads it: the client closed the connection
            reply.chunks(batch.result())
        return JSONResponse(reply.body())
    finally:
        gone.cancel()


async def disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the request's body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def stream(reply: Reply, events: Events, cancel: Callable[[], None], usage: bool) -> AsyncIterator[str]:
    """Server-Sent Events: each batch of the job's events as chunks, then the usage if asked, then [DONE]. A failure
    mid-stream is sent as an error event. Closed early (the client went away), the job is cancelled."""
    try:
        while not reply.done:
            try:
                batch = await events.next()
            except ApiError as e:
                yield sse(e.body()) + "data: [DONE]\n\n"
                return
            yield "".join(sse(chunk) for chunk in reply.chunks(batch))
        yield (sse(reply.usage_chunk()) if usage else "") + "data: [DONE]\n\n"
    finally:
        if not reply.done:
            cancel()


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def http_error(request: Request, error: Exception) -> Response:
    """Starlette's own errors (unknown path, wrong method) in OpenAI's shape."""
    assert isinstance(error, HTTPException)
    message = f"{request.method} {request.url.path}: {error.detail}"
    return JSONResponse(error_body(message, "invalid_request_error"), status_code=error.status_code,
                        headers=error.headers)


async def internal_error(request: Request, error: Exception) -> Response:
    return JSONResponse(error_body(f"internal error: {type(error).__name__}: {error}", "server_error"),
                        status_code=500)


class RequireApiKey:
    """ASGI middleware: with a key, a request to any path but OPEN_PATHS needs `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.expected is not None and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CountRequests:
    """ASGI middleware: counts every HTTP request by path (known routes; "other" for the rest) and status."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, known_paths: set[str]) -> None:
        self.app, self.metrics, self.known = app, metrics, known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            path = scope["path"] if scope["path"] in self.known else "other"
            self.metrics.requests.labels(path, str(status)).inc()
