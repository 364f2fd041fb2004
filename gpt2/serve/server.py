"""`gpt2 serve`: a loaded model behind the app (`gpt2.serve.app`), run by uvicorn until SIGTERM or Ctrl-C.

On SIGTERM uvicorn stops accepting connections and lets the requests in flight, streams included, finish (for at most
drain_timeout_s, after which they are cancelled); then the app's lifespan stops the scheduler, and the process exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn

from .app import ServerConfig, create_app
from .metrics import ServeMetrics
from .requests import Limits
from .scheduler import Scheduler

if TYPE_CHECKING:
    from ..model import GPT2

CPU_MAX_BATCH = 16  # the most rows the CPU's one-call C decode step takes (gpt2.cpu.decode_step)
CUDA_MAX_BATCH = 64  # a CUDA-graph step's time barely grows with its rows at these sizes


@dataclass(frozen=True)
class ServeOptions:
    model_id: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int | None = None  # None: default_max_batch
    max_queue: int = 64
    prefill_chunk: int = 256
    request_timeout_s: float = 600.0
    drain_timeout_s: int = 30
    api_key: str | None = None

    def __post_init__(self) -> None:
        max_batch = 1 if self.max_batch is None else self.max_batch  # None: the device's default
        for flag, value, least in (("--port", self.port, 0), ("--max-batch", max_batch, 1),
                                   ("--max-queue", self.max_queue, 1), ("--prefill-chunk", self.prefill_chunk, 1),
                                   ("--drain-timeout", self.drain_timeout_s, 0)):
            if value < least:
                raise ValueError(f"{flag} {value} must be at least {least}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"--request-timeout {self.request_timeout_s} must be > 0 seconds")


def default_max_batch(model: GPT2) -> int:
    return CUDA_MAX_BATCH if model.device.type == "cuda" else CPU_MAX_BATCH


def uvicorn_config(model: GPT2, options: ServeOptions) -> uvicorn.Config:
    """The app over model with options, as uvicorn runs it."""
    max_batch = default_max_batch(model) if options.max_batch is None else options.max_batch
    metrics = ServeMetrics()
    scheduler = Scheduler(model, metrics, max_batch, options.max_queue, options.prefill_chunk)
    limits = Limits(max_batch, model.config.n_positions, options.request_timeout_s)
    app = create_app(scheduler, model.tokenizer, ServerConfig(options.model_id, limits, options.api_key), metrics)
    return uvicorn.Config(app, host=options.host, port=options.port, access_log=False, log_level="info",
                          timeout_graceful_shutdown=options.drain_timeout_s)


def serve(model: GPT2, options: ServeOptions) -> None:
    """Serve model until SIGTERM or Ctrl-C (draining the requests in flight first)."""
    uvicorn.Server(uvicorn_config(model, options)).run()
