"""Prometheus metrics of one server (its own registry, exposed at ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("quiver_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("quiver_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("quiver_completion_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("quiver_queue_depth", "Requests waiting to join the batch", registry=r)
        self.running = Gauge("quiver_running_requests", "Requests in the running batch", registry=r)
        self.batch_size = Histogram("quiver_batch_size", "Rows per decoding step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.step_tokens = Histogram("quiver_step_tokens", "Tokens per forward step (prefill + decode)",
                                     registry=r, buckets=(1, 8, 32, 128, 512, 2048, 8192))
        self.ttft = Histogram("quiver_time_to_first_token_seconds", "Submission to first token",
                              registry=r, buckets=_LATENCY)
        self.latency = Histogram("quiver_request_latency_seconds", "Submission to last token",
                                 registry=r, buckets=_LATENCY)
        self.adapter_use = Counter("quiver_adapter_routing_weight",
                                   "Routing weight carried by each adapter, summed over generated and "
                                   "prompt tokens (a token routed to one adapter adds 1)", ["adapter"], registry=r)
        self.rejected = Counter("quiver_rejected_requests", "Requests refused before queueing, by reason",
                                ["reason"], registry=r)

        self.cancelled = Counter("quiver_cancelled_requests", "Requests dropped because their client left",
                                 registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
