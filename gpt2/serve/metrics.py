"""The server's Prometheus metrics, in a registry of their own (one per app), served by GET /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gpt2_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("gpt2_jobs_finished", "Generation jobs ended, by how: done, cancelled (the client "
                                "went away), timeout, error", ["outcome"], registry=r)
        self.prompt_tokens = Counter("gpt2_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("gpt2_generated_tokens", "Tokens generated", registry=r)
        self.queue_length = Gauge("gpt2_queue_length", "Jobs waiting for slots", registry=r)
        self.slots_in_use = Gauge("gpt2_slots_in_use", "KV-cache slots held by running choices", registry=r)
        self.slots_reserved = Gauge("gpt2_slots_reserved", "Slots promised to choices whose prompt is prefilling",
                                    registry=r)
        self.cache_rows = Gauge("gpt2_cache_rows", "Rows of the KV cache now (what a decode step runs)", registry=r)
        self.beam_rows = Gauge("gpt2_beam_rows", "Rows held by beam searches running beside the batch", registry=r)
        self.max_batch = Gauge("gpt2_max_batch", "Most choices decoding together (--max-batch)", registry=r)
        self.batch_rows = Histogram("gpt2_decode_batch_rows", "Choices decoded per decode step (batch occupancy)",
                                    buckets=ROW_BUCKETS, registry=r)
        self.step_seconds = Histogram("gpt2_decode_step_seconds", "Time of one decode step, choosing tokens included",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("gpt2_time_to_first_token_seconds",
                                             "From a job's arrival to its first token", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.time_per_token = Histogram("gpt2_time_per_output_token_seconds",
                                        "Between a choice's successive tokens", buckets=LATENCY_BUCKETS, registry=r)
