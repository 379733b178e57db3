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
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from meshkv.latency import LatencyHistogram
from meshkv.protocol import Op

if TYPE_CHECKING:
    from meshkv.puller import Puller
    from meshkv.tiers.remote import RemoteTier
    from meshkv.transfers import Transfers

LOCAL_OP_BUCKETS = (
    25e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3, 0.25, 1.0, 5.0,
)  # fmt: skip
"""Upper bounds (seconds) of ``meshkv_local_op_seconds``: local ops live in 10-500 µs."""

TIERS = ("cpu", "ssd", "peer", "remote")


@dataclasses.dataclass(slots=True)
class LocalCounters:
    """Plain-int counters the local server bumps on the hot path (read at scrape time)."""

    lookups: int = 0
    lookup_keys: int = 0
    hit_chunks: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    miss_chunks: int = 0
    hit_tokens: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    """Tokens of hit chunks, for clients that declared ``chunk_tokens`` at hello."""
    miss_tokens: int = 0
    connections: int = 0
    protocol_errors: int = 0
    refused_peers: int = 0
    """Connections refused because the process at the other end runs as another user."""
    reserve_unplaced: int = 0
    """Chunks a ``reserve`` found no room for (every slot pinned, reserved or too small)."""


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
    hit_tokens = CounterMetricFamily(
        "meshkv_lookup_hit_tokens",
        "Tokens in the stored prefix found by local lookups, by tier "
        "(clients that declared chunk_tokens at hello)",
        labels=["tier"],
    )
    for tier, n in local.hit_tokens.items():
        hit_tokens.add_metric([tier], n)
    yield hit_tokens
    miss_tokens = CounterMetricFamily(
        "meshkv_lookup_miss_tokens",
        "Tokens asked for by local lookups beyond the stored prefix (declared chunk_tokens)",
    )
    miss_tokens.add_metric([], local.miss_tokens)
    yield miss_tokens
    conns = GaugeMetricFamily("meshkv_local_connections", "Open local-channel connections")
    conns.add_metric([], local.connections)
    yield conns
    errors = CounterMetricFamily(
        "meshkv_local_protocol_errors", "Malformed, oversized or unknown local requests"
    )
    errors.add_metric([], local.protocol_errors)
    yield errors
    refused = CounterMetricFamily(
        "meshkv_local_refused_connections",
        "Local connections refused: the peer process runs as another user (SO_PEERCRED)",
    )
    refused.add_metric([], local.refused_peers)
    yield refused
    unplaced = CounterMetricFamily(
        "meshkv_local_reserve_unplaced_chunks",
        "Chunks an engine asked to store that found no room in the CPU tier (its slots "
        "pinned by readers, reserved or holding transfers); they were not stored",
    )
    unplaced.add_metric([], local.reserve_unplaced)
    yield unplaced


def as_mapping(snapshot: Any) -> Mapping[str, Any]:
    if dataclasses.is_dataclass(snapshot) and not isinstance(snapshot, type):
        return {f.name: getattr(snapshot, f.name) for f in dataclasses.fields(snapshot)}
    if isinstance(snapshot, Mapping):
        return snapshot
    raise TypeError(f"store snapshot must be a dataclass or a mapping, got {type(snapshot)}")


# StoreStats scalar → (metric name, help, counter?)
_STORE_SCALARS: dict[str, tuple[str, str, bool]] = {
    "lookups": ("meshkv_store_lookups", "Store lookups (local channel and peers)", True),
    "lookup_keys": ("meshkv_store_lookup_keys", "Keys asked for by store lookups", True),
    "read_keys": ("meshkv_read_keys", "Keys asked for by reads", True),
    "miss_chunks": ("meshkv_read_miss_chunks", "Read keys that no tier could serve", True),
    "namespace_mismatches": (
        "meshkv_namespace_mismatches",
        "Keys found under another namespace (never served)",
        True,
    ),
    "leases_open": ("meshkv_leases", "Open read leases (pins)", False),
    "pinned_chunks": ("meshkv_pinned_chunks", "Chunks with at least one open lease", False),
    "reservations_open": ("meshkv_reservations", "Open slot reservations", False),
    "leases_expired": (
        "meshkv_expired_leases",
        "Read leases that passed their deadline (their slots stay pinned until released)",
        True,
    ),
    "reservations_expired": (
        "meshkv_expired_reservations",
        "Reservations voided at their deadline (slots fenced until the writer is done)",
        True,
    ),
    "leases_overdue": (
        "meshkv_overdue_leases",
        "Open leases past their deadline (a client that does not release)",
        False,
    ),
    "fenced_slots": (
        "meshkv_fenced_slots",
        "Slots of voided reservations not reused until their writer commits, aborts or leaves",
        False,
    ),
    "late_commits": (
        "meshkv_late_commits",
        "Commits refused because the reservation had expired",
        True,
    ),
    "checksum_failures": (
        "meshkv_checksum_failures",
        "Payloads that failed their xxh3-64 check (dropped, never served)",
        True,
    ),
    "checksums_pending": ("meshkv_checksums_pending", "Commits whose checksum is pending", False),
    "demotions": ("meshkv_demotions", "Chunks written to SSD on CPU eviction", True),
    "demotions_dropped": (
        "meshkv_demotions_dropped",
        "Evicted chunks not written to SSD (queue full or tier degraded)",
        True,
    ),
    "promotions": ("meshkv_promotions", "Chunks read back from SSD into the arena", True),
    "promotion_failures": ("meshkv_promotion_failures", "SSD promotions that failed", True),
    "ssd_degraded": ("meshkv_ssd_degraded", "1 while the SSD tier refuses writes", False),
    "ssd_write_errors": ("meshkv_ssd_write_errors", "SSD write errors", True),
    "ssd_read_errors": ("meshkv_ssd_read_errors", "SSD read errors", True),
    "ssd_writes_refused": ("meshkv_ssd_writes_refused", "SSD writes refused (cap/degraded)", True),
    "ssd_direct_writes": (
        "meshkv_ssd_direct_writes",
        "SSD chunk files written with O_DIRECT (the rest went through the page cache)",
        True,
    ),
    "ssd_direct_reads": (
        "meshkv_ssd_direct_reads",
        "SSD reads whose whole blocks came by O_DIRECT straight into the arena slot",
        True,
    ),
    "ssd_partial_removed": (
        "meshkv_ssd_partial_files_removed",
        "Partial chunk files removed by the start-up scan",
        True,
    ),
    "ssd_corrupt_removed": (
        "meshkv_ssd_corrupt_files_removed",
        "Corrupt chunk files removed",
        True,
    ),
}

# TierStats field → (metric name, help, counter?)
_TIER_FIELDS: dict[str, tuple[str, str, bool]] = {
    "chunks": ("meshkv_tier_chunks", "Chunks stored in the tier", False),
    "usage_bytes": ("meshkv_tier_usage_bytes", "Bytes used in the tier", False),
    "capacity_bytes": ("meshkv_tier_capacity_bytes", "Capacity of the tier in bytes", False),
    "hit_chunks": ("meshkv_hit_chunks", "Chunks served by reads, by tier", True),
    "stored_bytes": ("meshkv_stored_bytes", "Bytes stored into the tier", True),
    "loaded_bytes": ("meshkv_loaded_bytes", "Bytes served from the tier", True),
}


def _family(name: str, text: str, counter: bool, labels: list[str]) -> Metric:
    if counter:
        return CounterMetricFamily(name, text, labels=labels)
    return GaugeMetricFamily(name, text, labels=labels)


def store_families(stats: Mapping[str, Any]) -> Iterator[Metric]:
    """Map a store snapshot to ``meshkv_*`` families (docs/agent.md lists them)."""
    for field_name, (name, text, counter) in _STORE_SCALARS.items():
        value = stats.get(field_name)
        if value is None:
            continue
        family = _family(name, text, counter, [])
        family.add_metric([], float(value))  # type: ignore[attr-defined]
        yield family
    tiers: Mapping[str, Any] = stats.get("tiers") or {}
    per_tier = {name: as_mapping(t) for name, t in tiers.items()}
    for field_name, (name, text, counter) in _TIER_FIELDS.items():
        family = _family(name, text, counter, ["tier"])
        for tier, values in per_tier.items():
            if field_name in values:
                family.add_metric([tier], float(values[field_name]))  # type: ignore[attr-defined]
        yield family
    evictions = CounterMetricFamily(
        "meshkv_evictions", "Chunks that left a tier, by tier and reason", labels=["tier", "reason"]
    )
    for tier, values in per_tier.items():
        for reason, n in (values.get("evictions") or {}).items():
            evictions.add_metric([tier, reason], float(n))
    yield evictions


# ======================================================================================
# Mesh metrics (owned by the mesh shell, meshkv/mesh/node.py; registered by its factory).
# The collector reads ``source.metrics_snapshot()`` at scrape time: a plain mapping with
# the keys used below, so this module does not import the mesh.
# ======================================================================================


class MeshCollector(Collector):
    """``meshkv_mesh_*`` / ``meshkv_peer_*`` families from the mesh node's snapshot."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        s: Mapping[str, Any] = self._source.metrics_snapshot()
        members = GaugeMetricFamily(
            "meshkv_mesh_members", "Members this node knows, by state", labels=["state"]
        )
        for state, n in s["members"].items():
            members.add_metric([state], n)
        yield members
        events = CounterMetricFamily(
            "meshkv_mesh_membership_events",
            "Membership changes seen (joined, suspect, alive=refuted, dead, left)",
            labels=["kind"],
        )
        for kind, n in s["events"].items():
            events.add_metric([kind], n)
        yield events
        yield CounterMetricFamily(
            "meshkv_mesh_suspicions", "Members this node saw become suspect", value=s["suspicions"]
        )
        yield CounterMetricFamily(
            "meshkv_mesh_refutations",
            "Suspicions of this node that it refuted (incarnation bumped)",
            value=s["refutations"],
        )
        yield CounterMetricFamily(
            "meshkv_mesh_probe_failures", "Failure-detector probes that got no ack",
            value=s["probe_failures"],
        )  # fmt: skip
        yield GaugeMetricFamily(
            "meshkv_mesh_directory_keys", "Keys this node is home of", value=s["directory_keys"]
        )
        yield GaugeMetricFamily(
            "meshkv_mesh_held_keys",
            "Keys this node holds and announces to their homes",
            value=s["held_keys"],
        )
        yield GaugeMetricFamily(
            "meshkv_mesh_ring_members", "Members on this node's ring", value=s["ring_members"]
        )
        yield CounterMetricFamily(
            "meshkv_peer_pulls", "Chunks pulled from peers and committed", value=s["pulls_ok"]
        )
        yield CounterMetricFamily(
            "meshkv_peer_pull_bytes", "Payload bytes pulled from peers", value=s["pull_bytes"]
        )
        yield CounterMetricFamily(
            "meshkv_peer_transfer_renewals_sent",
            "Transfers this node asked their producers to keep holding (queued decode requests)",
            value=s.get("transfer_renewals_sent", 0),
        )
        failures = CounterMetricFamily(
            "meshkv_peer_pull_failures",
            "Failed pull attempts by cause (timeout, transport, checksum, stale, ...)",
            labels=["cause"],
        )
        for cause, n in s["pull_failures"].items():
            failures.add_metric([cause], n)
        yield failures
        latency: LatencyHistogram = s["pull_latency"]
        hist = HistogramMetricFamily(
            "meshkv_peer_pull_seconds", "Latency of successful pull attempts, request to commit"
        )
        hist.add_metric([], latency.cumulative(), sum_value=latency.total)
        yield hist
        yield CounterMetricFamily(
            "meshkv_peer_handshake_failures",
            "Peer handshakes that failed (wrong mesh secret, bad hello, timeout)",
            value=s["handshake_failures"],
        )
        yield CounterMetricFamily(
            "meshkv_mesh_node_id_conflicts",
            "Handshakes refused because the other agent claims this node's id",
            value=s["id_conflicts"],
        )
        yield CounterMetricFamily(
            "meshkv_peer_checksum_failures",
            "Chunks from peers dropped because their checksum failed",
            value=s["checksum_failures"],
        )
        yield CounterMetricFamily(
            "meshkv_peer_protocol_errors",
            "Peer connections dropped for malformed or oversized frames",
            value=s["protocol_errors"],
        )
        yield CounterMetricFamily(
            "meshkv_peer_served_bytes", "Chunk payload bytes sent to peers",
            value=s["served_bytes"],
        )  # fmt: skip
        yield CounterMetricFamily(
            "meshkv_peer_replica_pushes", "Chunk copies pushed to ring successors and stored",
            value=s["replica_pushes"],
        )  # fmt: skip
        yield CounterMetricFamily(
            "meshkv_peer_transfer_pushes",
            "Chunks of prefill/decode transfers pushed to the decode node and stored",
            value=s["transfer_pushes"],
        )
        yield CounterMetricFamily(
            "meshkv_mesh_repairs",
            "Chunk copies queued to restore --replicas after a member died or left",
            value=s["repairs_scheduled"],
        )
        push_failures = CounterMetricFamily(
            "meshkv_peer_push_failures", "Failed pushes by cause", labels=["cause"]
        )
        for cause, n in s["push_failures"].items():
            push_failures.add_metric([cause], n)
        yield push_failures


class PullerCollector(Collector):
    """``meshkv_flights_*``: the puller's work (making chunks resident) and P/D holds."""

    def __init__(self, puller: Puller, transfers: Transfers | None) -> None:
        self._puller = puller
        self._transfers = transfers

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        st = self._puller.stats
        yield GaugeMetricFamily(
            "meshkv_flights_in_flight", "Chunks being made resident now",
            value=self._puller.in_flight,
        )  # fmt: skip
        yield CounterMetricFamily(
            "meshkv_flights_started", "Flights started (promotions, pulls, waits)",
            value=st.started,
        )  # fmt: skip
        by_way = CounterMetricFamily(
            "meshkv_flights_resident",
            "Flights that made their chunk resident, by way (ssd, peer, settled, cpu)",
            labels=["way"],
        )
        for way, n in st.by_way.items():
            by_way.add_metric([way], n)
        yield by_way
        yield CounterMetricFamily(
            "meshkv_flights_failed", "Flights that ended without the chunk (a miss)",
            value=st.failed,
        )  # fmt: skip
        failures = CounterMetricFamily(
            "meshkv_flight_failures", "Failed steps of flights by cause", labels=["cause"]
        )
        for cause, n in st.failures.items():
            failures.add_metric([cause], n)
        yield failures
        yield CounterMetricFamily(
            "meshkv_flights_joined", "Requests that joined a flight already running",
            value=st.joined,
        )  # fmt: skip
        yield CounterMetricFamily(
            "meshkv_read_late_ssd_chunks",
            "Chunks an engine's read went without: their promotion from SSD was still "
            "running at the read's deadline (computed by the engine; the promotion goes on)",
            value=st.reads_late_ssd,
        )
        yield CounterMetricFamily(
            "meshkv_read_promotions",
            "SSD promotions a read started itself: the chunk left memory between its lookup "
            "and its read (a CPU tier too small for the requests in flight)",
            value=st.read_promotions,
        )
        hist = HistogramMetricFamily(
            "meshkv_flight_seconds", "Seconds from a flight's start until its chunk was resident"
        )
        hist.add_metric([], st.latency.cumulative(), sum_value=st.latency.total)
        yield hist
        yield CounterMetricFamily(
            "meshkv_transfers_abandoned",
            "Transfers an engine here dropped before loading them (a decode request aborted "
            "while queued); their producers were told to release them",
            value=st.transfers_abandoned,
        )
        yield CounterMetricFamily(
            "meshkv_transfers_received",
            "Prefill/decode transfers this node finished waiting for (all chunks here or given up)",
            value=st.transfers,
        )
        yield CounterMetricFamily(
            "meshkv_transfers_incomplete",
            "Received transfers with a chunk that never arrived (recomputed by the engine)",
            value=st.transfers_incomplete,
        )
        yield CounterMetricFamily(
            "meshkv_transfer_received_bytes",
            "Bytes of transfers' chunks that came over the network after their lookup",
            value=st.transfer_bytes,
        )
        wait = HistogramMetricFamily(
            "meshkv_transfer_wait_seconds",
            "From the lookup naming a transfer until its last chunk was here (decode side)",
        )
        wait.add_metric([], st.transfer_wait.cumulative(), sum_value=st.transfer_wait.total)
        yield wait
        transfers = self._transfers
        if transfers is not None:
            ts = transfers.stats
            yield GaugeMetricFamily(
                "meshkv_transfers_open", "Prefill/decode transfers held on this node",
                value=transfers.open,
            )  # fmt: skip
            yield GaugeMetricFamily(
                "meshkv_transfer_pins", "Chunk pins held for prefill/decode transfers",
                value=transfers.pinned,
            )  # fmt: skip
            ended = CounterMetricFamily(
                "meshkv_transfers_ended",
                "Transfers whose hold ended, by how (released, expired, evicted)",
                labels=["how"],
            )
            ended.add_metric(["released"], ts.released)
            ended.add_metric(["expired"], ts.expired)
            ended.add_metric(["evicted"], ts.evicted)
            yield ended
            renewals = CounterMetricFamily(
                "meshkv_transfer_renewals",
                "Renewals of held transfers asked by their consumers (queued decode requests), "
                "by result: renewed, or unknown (released or expired here before)",
                labels=["result"],
            )
            renewals.add_metric(["renewed"], ts.renewed)
            renewals.add_metric(["unknown"], ts.renew_unknown)
            yield renewals


class RemoteCollector(Collector):
    """``meshkv_remote_*``: the shared Redis/Valkey tier (``meshkv.tiers.remote``)."""

    def __init__(self, remote: RemoteTier) -> None:
        self._remote = remote

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        st = self._remote.stats
        yield GaugeMetricFamily(
            "meshkv_remote_up", "1 when the last call to the remote tier succeeded, else 0",
            value=1 if self._remote.up else 0,
        )  # fmt: skip
        yield CounterMetricFamily(
            "meshkv_remote_writes", "Chunks copied to the remote tier", value=st.writes
        )
        yield CounterMetricFamily(
            "meshkv_remote_write_bytes", "Bytes copied to the remote tier (headers included)",
            value=st.write_bytes,
        )  # fmt: skip
        yield CounterMetricFamily(
            "meshkv_remote_refreshed",
            "Copies of chunks the remote tier already held (their TTL renewed)",
            value=st.refreshed,
        )
        yield CounterMetricFamily(
            "meshkv_remote_evicted", "Values the byte cap pushed out for this node's writes",
            value=st.evicted,
        )  # fmt: skip
        dropped = CounterMetricFamily(
            "meshkv_remote_dropped",
            "Write-behind copies not made, by reason (queue_full, unavailable, evicted, failed)",
            labels=["reason"],
        )
        for reason in ("queue_full", "unavailable", "evicted", "failed"):
            dropped.add_metric([reason], st.dropped[reason])
        yield dropped
        yield GaugeMetricFamily(
            "meshkv_remote_queued_bytes", "Bytes waiting in the write-behind queue",
            value=st.queued_bytes,
        )  # fmt: skip
        yield CounterMetricFamily(
            "meshkv_remote_found", "Lookup keys the remote tier reported present", value=st.found
        )
        yield CounterMetricFamily(
            "meshkv_remote_reads", "Chunks fetched from the remote tier, verified and stored",
            value=st.reads,
        )  # fmt: skip
        yield CounterMetricFamily(
            "meshkv_remote_read_bytes", "Payload bytes fetched from the remote tier",
            value=st.read_bytes,
        )  # fmt: skip
        yield CounterMetricFamily(
            "meshkv_remote_misses", "Fetches that found no value (expired or evicted meanwhile)",
            value=st.misses,
        )  # fmt: skip
        yield CounterMetricFamily(
            "meshkv_remote_corrupt", "Values that failed verification (deleted; a miss)",
            value=st.corrupt,
        )  # fmt: skip
        errors = CounterMetricFamily(
            "meshkv_remote_errors", "Failed calls to the remote tier by kind", labels=["kind"]
        )
        for kind in ("timeout", "connection", "auth", "other"):
            errors.add_metric([kind], st.errors[kind])
        yield errors
        yield CounterMetricFamily(
            "meshkv_remote_skipped", "Calls not made while the remote tier was backed off",
            value=st.skipped,
        )  # fmt: skip
        for name, hist, what in (
            ("meshkv_remote_read_seconds", st.read_latency, "fetch (read, verify, store)"),
            ("meshkv_remote_write_seconds", st.write_latency, "write-behind copy"),
        ):
            family = HistogramMetricFamily(name, f"Seconds of one remote-tier {what}")
            family.add_metric([], hist.cumulative(), sum_value=hist.total)
            yield family
