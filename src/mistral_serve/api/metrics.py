"""Prometheus metrics, per served model.

Each app has its own registry (no process globals), so several apps in one process, as in the
tests, never share counters. Engine state (running, waiting, KV blocks) is each engine client's
`stats()` when scraped; latencies and token counts are recorded by the chat path as requests stream.
"""

from __future__ import annotations

from collections.abc import Iterator
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mistral_serve.catalog import Catalog

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)

_ENGINE_GAUGES = {
    "mistral_serve_requests_running": ("Sequences being decoded or prefilled.", "num_running"),
    "mistral_serve_requests_waiting": ("Sequences queued for the engine.", "num_waiting"),
    "mistral_serve_kv_blocks_used": ("KV cache blocks held by sequences.", "num_kv_blocks_used"),
    "mistral_serve_kv_blocks_total": ("KV cache blocks in all.", "num_kv_blocks_total"),
}


class _EngineCollector(Collector):
    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (documentation, attribute) in _ENGINE_GAUGES.items():
            family = GaugeMetricFamily(name, documentation, labels=["model"])
            for served in self.catalog:
                family.add_metric([served.id], getattr(served.client.stats(), attribute))
            yield family


class ServingMetrics:
    def __init__(self, catalog: Catalog):
        self.registry = CollectorRegistry()
        self.time_to_first_token = Histogram(
            "mistral_serve_time_to_first_token_seconds", "From a request's arrival to its first generated token.",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "mistral_serve_inter_token_latency_seconds", "Between consecutive tokens of one choice.",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("mistral_serve_prompt_tokens", "Prompt tokens of requests that ran.",
                                     ["model"], registry=self.registry)
        self.generation_tokens = Counter("mistral_serve_generation_tokens", "Tokens generated.",
                                         ["model"], registry=self.registry)
        self.requests = Counter("mistral_serve_requests", "Chat requests that ran, by how they ended.",
                                ["model", "outcome"], registry=self.registry)
        self.registry.register(_EngineCollector(catalog))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, model_id: str) -> RequestTimer:
        return RequestTimer(self, model_id)


class RequestTimer:
    """Latencies of one request as its tokens come out (each choice timed on its own)."""

    def __init__(self, metrics: ServingMetrics, model_id: str):
        self.metrics = metrics
        self.model_id = model_id
        self.started = time.perf_counter()
        self.last_token_at: dict[int, float] = {}

    def on_tokens(self, choice_index: int, num_tokens: int) -> None:
        if not num_tokens:
            return
        now = time.perf_counter()
        last = self.last_token_at.get(choice_index)
        if last is None:
            self.metrics.time_to_first_token.labels(self.model_id).observe(now - self.started)
        else:
            self.metrics.inter_token_latency.labels(self.model_id).observe((now - last) / num_tokens)
        self.last_token_at[choice_index] = now

    def on_end(self, num_prompt_tokens: int, num_generated_tokens: int, outcome: str) -> None:
        self.metrics.prompt_tokens.labels(self.model_id).inc(num_prompt_tokens)
        self.metrics.generation_tokens.labels(self.model_id).inc(num_generated_tokens)
        self.metrics.requests.labels(self.model_id, outcome).inc()
