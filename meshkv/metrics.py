"""Every Prometheus metric the agent exports (``meshkv_*``), one registry per agent.

No global default registry: several agents (or stores) may live in one test process.
Counters and gauges owned by the store are not mirrored on every operation; a custom
collector reads ``store.snapshot()`` at scrape time. Latency histograms of local ops are
observed by the local server. Other parts add their own collectors with
``AgentMetrics.register`` (the mesh adds ``meshkv_mesh_*`` / ``meshkv_peer_*``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshkv.protocol import Op

LOCAL_OP_BUCKETS = (
    25e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3, 0.25, 1.0, 5.0,
)  # fmt: skip
"""Upper bounds (seconds) of ``meshkv_local_op_seconds``: local ops live in 10-500 µs."""

TIERS = ("cpu", "ssd", "peer")


@dataclasses.dataclass(slots=True)
class LocalCounters:
    """Plain-int counters the local server bumps on the hot path (read at scrape time)."""

    lookups: int = 0
    lookup_keys: int = 0
    hit_chunks: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    miss_chunks: int = 0
    connections: int = 0
    protocol_errors: int = 0


class AgentMetrics:
    """The registry of one agent plus the instruments its servers use."""

    def __init__(self, snapshot: Callable[[], Any], node_id: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.local = LocalCounters()
        self.started = time.time()
        self.op_seconds = Histogram(
            "meshkv_local_op_seconds",
            "Local-channel request latency in the agent, decode to reply, by op",
            ["op"],
            buckets=LOCAL_OP_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(snapshot, self.local, node_id, self.started))

    def op_observers(self) -> dict[str, Callable[[float], None]]:
        """Bound ``observe`` per op (label lookup done once, not per request)."""
        return {op.value: self.op_seconds.labels(op.value).observe for op in Op}

    def register(self, collector: Collector) -> None:
        """Add another part's collector (e.g. the mesh's) to this agent's registry."""
        self.registry.register(collector)


class _SnapshotCollector(Collector):
    def __init__(
        self, snapshot: Callable[[], Any], local: LocalCounters, node_id: str, started: float
    ) -> None:
        self._snapshot = snapshot
        self._local = local
        self._node_id = node_id
        self._started = started

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the snapshot; skip auto-describe

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("meshkv_agent_info", "Agent identity", labels=["node_id"])
        info.add_metric([self._node_id], 1.0)
        yield info
        uptime = GaugeMetricFamily("meshkv_uptime_seconds", "Seconds since the agent started")
        uptime.add_metric([], time.time() - self._started)
        yield uptime
        yield from _local_families(self._local)
        yield from store_families(as_mapping(self._snapshot()))


def _local_families(local: LocalCounters) -> Iterator[Metric]:
    lookups = CounterMetricFamily("meshkv_lookups", "Lookup requests on the local channel")
    lookups.add_metric([], local.lookups)
    yield lookups
    hits = CounterMetricFamily(
        "meshkv_lookup_hit_chunks",
        "Chunks found (in the stored prefix) by local lookups, by tier",
        labels=["tier"],
    )
    for tier, n in local.hit_chunks.items():
        hits.add_metric([tier], n)
    yield hits
    miss = CounterMetricFamily(
        "meshkv_lookup_miss_chunks", "Chunks asked for by local lookups that were not served"
    )
    miss.add_metric([], local.miss_chunks)
    yield miss
    conns = GaugeMetricFamily("meshkv_local_connections", "Open local-channel connections")
    conns.add_metric([], local.connections)
    yield conns
    errors = CounterMetricFamily(
        "meshkv_local_protocol_errors", "Malformed, oversized or unknown local requests"
    )
    errors.add_metric([], local.protocol_errors)
    yield errors


def as_mapping(snapshot: Any) -> Mapping[str, Any]:
    if dataclasses.is_dataclass(snapshot) and not isinstance(snapshot, type):
        return {f.name: getattr(snapshot, f.name) for f in dataclasses.fields(snapshot)}
    if isinstance(snapshot, Mapping):
        return snapshot
    raise TypeError(f"store snapshot must be a dataclass or a mapping, got {type(snapshot)}")


def store_families(stats: Mapping[str, Any]) -> Iterator[Metric]:
    """Map a store snapshot to ``meshkv_*`` families (see docs/agent.md for the list)."""
    yield from ()
