"""Prometheus metrics of one server (prometheus-client), in a registry of its own so that
several servers can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("smoe_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("smoe_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("smoe_generation_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("smoe_cancelled_sequences", "sequences cancelled by a client going away",
                                 registry=r)
        self.queue_length = Gauge("smoe_queue_length", "requests waiting for a cache row", registry=r)
        self.running = Gauge("smoe_running_sequences", "sequences holding a cache row", registry=r)
        self.time_to_first_token = Histogram("smoe_time_to_first_token_seconds", "from arrival to the first token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.request_tokens_per_s = Histogram("smoe_request_decode_tokens_per_second",
                                              "decode speed each request saw", buckets=RATE_BUCKETS, registry=r)
        self.decode_tokens_per_s = Gauge("smoe_decode_tokens_per_second",
                                         "tokens per second over all sequences, recent decode steps", registry=r)
        self._tokens, self._seconds = 0.0, 0.0

    def observe_step(self, tokens: int, seconds: float) -> None:
        # an exponentially weighted rate over roughly the last 20 steps
        self._tokens = 0.95 * self._tokens + tokens
        self._seconds = 0.95 * self._seconds + seconds
        self.decode_tokens_per_s.set(self._tokens / self._seconds if self._seconds else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
