"""Server metrics in the Prometheus text format (`GET /metrics`), on a registry of the server's own.

Counters (requests by endpoint and status, prompt and generated tokens) for Prometheus to rate, and
gauges for what a scrape should see at once: queue depth, slots in use, requests and tokens per
second over the last few seconds; histograms of request latency and time to first token.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, slots: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nemojax_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("nemojax_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("nemojax_generated_tokens", "Generated tokens of finished requests",
                                        registry=r)
        self.queue_depth = Gauge("nemojax_queue_depth", "Requests waiting for a decode slot", registry=r)
        self.slots_used = Gauge("nemojax_slots_used", "Decode slots in use", registry=r)
        self.slots_total = Gauge("nemojax_slots_total", "Decode slots", registry=r)
        self.requests_per_second = Gauge("nemojax_requests_per_second", "Finished requests per second (recent)",
                                         registry=r)
        self.tokens_per_second = Gauge("nemojax_tokens_per_second", "Generated tokens per second (recent)",
                                       registry=r)
        self.latency = Histogram("nemojax_request_seconds", "Time from submission to the last token", registry=r)
        self.first_token = Histogram("nemojax_time_to_first_token_seconds", "Time from submission to the first token",
                                     registry=r)
        self.slots_total.set(slots)

    def counted(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def finished(self, ticket: Any) -> None:
        """A ticket ended (called on the scheduler's thread)."""
        self.prompt_tokens.inc(len(ticket.request.prompt_ids))
        self.generated_tokens.inc(len(ticket.output_ids))
        if ticket.finished_at is not None:
            self.latency.observe(ticket.finished_at - ticket.submitted_at)
        if ticket.first_token_at is not None:
            self.first_token.observe(ticket.first_token_at - ticket.submitted_at)

    def update(self, snapshot: dict[str, int], requests_per_second: float, tokens_per_second: float) -> None:
        self.queue_depth.set(snapshot["waiting"])
        self.slots_used.set(snapshot["running"])
        self.requests_per_second.set(requests_per_second)
        self.tokens_per_second.set(tokens_per_second)

    def text(self) -> bytes:
        return generate_latest(self.registry)
