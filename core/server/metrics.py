"""Prometheus metrics of one server (own registry, so several apps can live in one process)."""

from __future__ import annotations

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("q_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("q_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("q_generation_tokens", "Tokens generated",
                                         registry=r)
        self.queue_depth = Gauge("q_queue_depth", "Requests waiting for a batch slot",
                                 registry=r)
        self.running = Gauge("q_running_requests", "Requests in the running batch",
                             registry=r)
        self.latency = Histogram("q_request_latency_seconds", "End-to-end request latency",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("q_time_to_first_token_seconds", "Time to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("q_batch_size", "Running requests per engine step",
                                    buckets=BATCH_BUCKETS, registry=r)

    def observe_step(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.queue_depth.set(waiting)
        if running:
            self.batch_size.observe(running)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
