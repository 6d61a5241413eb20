"""Prometheus metrics, per served model.

Each app has its own registry (no process globals), so several apps in one process, as in the
tests, never share counters. Engine state (running, waiting, KV blocks) is each engine client's
`stats()` when scraped; latencies and token counts are recorded by the chat path as requests stream.
"""

from __future__ import annotations

from collections.abc import Iterator
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mistral_serve.catalog import Catalog
from mistral_serve.engine.client import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)

_ENGINE_GAUGES = {
    "mistral_serve_requests_running": ("Sequences being decoded or prefilled.", "num_running"),
    "mistral_serve_requests_waiting": ("Sequences queued for the engine.", "num_waiting"),
    "mistral_serve_kv_blocks_used": ("KV cache blocks held by sequences.", "num_kv_blocks_used"),
    "mistral_serve_kv_blocks_total": ("KV cache blocks in all.", "num_kv_blocks_total"),
}


# the same facts in vLLM's names, which dashboards and routers made for vLLM read (`mistral-serve engine`)
_VLLM_GAUGES = {
    "vllm:num_requests_running": ("Requests in the batch (vLLM's name).", "num_running"),
    "vllm:num_requests_waiting": ("Requests waiting for the batch (vLLM's name).", "num_waiting"),
}
_VLLM_COUNTERS = {
    "vllm:prefix_cache_queries": ("Prompt tokens looked up in the prefix cache (vLLM's name).",
                                  "num_prefix_cache_queries"),
    "vllm:prefix_cache_hits": ("Prompt tokens found in the prefix cache (vLLM's name).", "num_prefix_cache_hits"),
}


class _EngineCollector(Collector):
    """Each local engine's state when scraped; each pool's upstreams and their health."""

    def __init__(self, catalog: Catalog, *, is_vllm_named_too: bool):
        self.catalog = catalog
        self.is_vllm_named_too = is_vllm_named_too

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engines = [(served.id, stats) for served in self.catalog if (stats := served.client.stats()) is not None]
        for name, (documentation, attribute) in _ENGINE_GAUGES.items():
            family = GaugeMetricFamily(name, documentation, labels=["model"])
            for model_id, stats in engines:
                family.add_metric([model_id], getattr(stats, attribute))
            yield family
        if self.is_vllm_named_too:
            yield from _vllm_named(engines)
        yield from self._upstreams()

    def _upstreams(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["model", "upstream"]
        healthy = GaugeMetricFamily("mistral_serve_upstream_healthy",
                                    "1 while a pool's upstream is in rotation, 0 while it is ejected.", labels=labels)
        in_flight = GaugeMetricFamily("mistral_serve_upstream_requests_in_flight",
                                      "Requests a pool's upstream is answering now.", labels=labels)
        requests = CounterMetricFamily("mistral_serve_upstream_requests", "Requests sent to a pool's upstream.",
                                       labels=labels)
        failures = CounterMetricFamily("mistral_serve_upstream_failures",
                                       "Failures of a pool's upstream: refused connections, 5xx, broken streams.",
                                       labels=labels)
        for served in self.catalog:
            for member in served.client.upstreams():
                values = [served.id, member.name]
                healthy.add_metric(values, 1 if member.state == "healthy" else 0)
                in_flight.add_metric(values, member.num_in_flight)
                requests.add_metric(values, member.num_requests)
                failures.add_metric(values, member.num_failures)
        yield from (healthy, in_flight, requests, failures)


def _vllm_named(engines: list[tuple[str, EngineStats]]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    for name, (documentation, attribute) in _VLLM_GAUGES.items():
        family = GaugeMetricFamily(name, documentation, labels=["model_name"])
        for model_id, stats in engines:
            family.add_metric([model_id], getattr(stats, attribute))
        yield family
    usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache blocks in use, 1 = all (vLLM's name).",
                              labels=["model_name"])
    for model_id, stats in engines:
        usage.add_metric([model_id], stats.num_kv_blocks_used / max(stats.num_kv_blocks_total, 1))
    yield usage
    for name, (documentation, attribute) in _VLLM_COUNTERS.items():
        family = CounterMetricFamily(name, documentation, labels=["model_name"])
        for model_id, stats in engines:
            family.add_metric([model_id], getattr(stats, attribute))
        yield family


class ServingMetrics:
    def __init__(self, catalog: Catalog, *, is_vllm_named_too: bool = False):
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
        self.registry.register(_EngineCollector(catalog, is_vllm_named_too=is_vllm_named_too))

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
