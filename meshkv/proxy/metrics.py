"""``meshkv_proxy_*``: what the proxy exports on ``/metrics`` (one registry per proxy)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshkv.proxy.upstreams import UpstreamPool

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
"""Upper bounds (seconds) of the TTFT and latency histograms."""


class ProxyMetrics:
    """The proxy's instruments."""

    def __init__(self, pools: list[UpstreamPool]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "meshkv_proxy_requests",
            "Client requests by route and answer status",
            ["route", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "meshkv_proxy_ttft_seconds",
            "Time to first token of streamed requests, arrival to first content chunk",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "meshkv_proxy_request_seconds",
            "Latency of client requests, arrival to last byte",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prefill = Histogram(
            "meshkv_proxy_prefill_seconds",
            "Prefill leg of disaggregated requests (the max_tokens=1 request)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "meshkv_proxy_prefill_fallbacks",
            "Disaggregated requests whose prefill failed and were computed by the decode engine",
            registry=self.registry,
        )
        self.prefill_without_params = Counter(
            "meshkv_proxy_prefill_without_params",
            "Prefill answers with no kv_transfer_params (a prefill engine without a KV "
            "connector?): the decode engine computed the prompt again",
            registry=self.registry,
        )
        self.whole_on_prefill = Counter(
            "meshkv_proxy_whole_on_prefill",
            "Disaggregated requests that read no cache (prompt logprobs) and so ran whole "
            "on a prefill engine, with no prefill leg or transfer",
            registry=self.registry,
        )
        self.route_choices = Counter(
            "meshkv_proxy_route_choices",
            "Engine choices of the aggregated router, by reason (cache, load, affinity, ...)",
            ["reason"],
            registry=self.registry,
        )
        self.routed_prompt_tokens = Counter(
            "meshkv_proxy_routed_prompt_tokens",
            "Prompt tokens of requests routed cache-aware",
            registry=self.registry,
        )
        self.routed_prefix_tokens = Counter(
            "meshkv_proxy_routed_prefix_tokens",
            "Of those, tokens the chosen engine's node held (SSD tokens weighted)",
            registry=self.registry,
        )
        self.prefix_query_failures = Counter(
            "meshkv_proxy_prefix_query_failures",
            "Prefix queries to agents (or /tokenize calls) that failed or timed out",
            registry=self.registry,
        )
        self.registry.register(_UpstreamCollector(pools))


class _UpstreamCollector(Collector):
    def __init__(self, pools: list[UpstreamPool]) -> None:
        self._pools = pools

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ["upstream", "role"]
        inflight = GaugeMetricFamily(
            "meshkv_proxy_upstream_inflight", "Requests in flight per upstream", labels=labels
        )
        healthy = GaugeMetricFamily(
            "meshkv_proxy_upstream_healthy", "1 while the upstream is in rotation", labels=labels
        )
        sent = CounterMetricFamily(
            "meshkv_proxy_upstream_requests", "Requests sent per upstream", labels=labels
        )
        errors = CounterMetricFamily(
            "meshkv_proxy_upstream_errors",
            "Failed upstream requests by kind (connect, timeout, http_5xx, http_4xx)",
            labels=[*labels, "kind"],
        )
        for pool in self._pools:
            for u in pool.upstreams:
                inflight.add_metric([u.name, u.role], u.inflight)
                healthy.add_metric([u.name, u.role], 1 if u.healthy else 0)
                sent.add_metric([u.name, u.role], u.requests)
                for kind, n in u.errors.items():
                    errors.add_metric([u.name, u.role, kind], n)
        yield inflight
        yield healthy
        yield sent
        yield errors
