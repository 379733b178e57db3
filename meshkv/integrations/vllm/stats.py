"""Connector counters: a per-process registry plus vLLM's ``KVConnectorStats`` carrier.

Each connector instance (scheduler or worker side) owns a ``ConnectorCounters``. The
worker side ships the increments of every step to vLLM's stats logger through
``get_kv_connector_stats`` (logged as "KV Transfer metrics: ..." and counted on the API
server's ``/metrics`` as ``vllm:meshkv_<counter>_total`` by ``MeshKVPromMetrics``); the
scheduler side's go the same way (vLLM adds them to the workers'). All instances of a
process are also visible through ``registry_snapshot()``, which tests and the benchmark
read in single-process engines.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field, fields
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)


@dataclass(slots=True)
class ConnectorCounters:
    """Monotonic counters of one connector instance."""

    lookups: int = 0
    """Lookup round-trips (one per new request)."""
    lookup_errors: int = 0
    """Lookups that failed or timed out (reported as zero hits)."""
    hit_tokens: int = 0
    """Tokens promised to vLLM as loadable (after vLLM's own prefix-cache hits)."""
    async_loads: int = 0
    """Requests whose chunks were loaded off the step (SSD or peer)."""
    reloads: int = 0
    """Requests looked up and loaded again after vLLM preempted them (instead of computed)."""
    loaded_chunks: int = 0
    loaded_bytes: int = 0
    load_errors: int = 0
    """Chunks that could not be loaded; their blocks were handed back for recompute."""
    corrupt_chunks: int = 0
    """Loaded chunks whose bytes did not match their commit checksum (``verify_loads``):
    recomputed, and dropped by the agent."""
    verify_seconds: float = 0.0
    """Time spent hashing loaded chunks (``verify_loads``)."""
    saved_chunks: int = 0
    saved_bytes: int = 0
    save_skipped: int = 0
    """Chunks not saved because the agent refused (no space) or was unreachable."""
    save_duplicates: int = 0
    """Chunks the agent already held (nothing copied)."""
    agent_unavailable: int = 0
    """Calls skipped or failed because the agent could not be reached (breaker open)."""
    agent_slow: int = 0
    """Calls that missed their deadline (a miss for that request only)."""
    transfers_out: int = 0
    """Prefill requests that finished with kv_transfer_params for a decode engine."""
    transfers_in: int = 0
    """Decode requests whose prompt KV was loaded from a prefill engine's transfer."""
    transfer_tokens: int = 0
    """Prompt tokens promised to vLLM from transfers (decode side)."""
    transfer_renewals: int = 0
    """Renewals of producers' holds sent for decode requests still queued (decode side)."""
    transfers_abandoned: int = 0
    """Decode requests that ended before loading their transfer (aborted while queued):
    their producers were told to let go (decode side)."""
    transfer_mismatches: int = 0
    """Decode requests whose prefill engine's KV is not this engine's (another model name,
    dtype, block size, TP size, drafter...): computed here, with a warning."""
    call_seconds: float = 0.0
    """Wall time spent inside connector calls that talk to the agent or copy KV."""
    async_wait_seconds: float = 0.0
    """Asynchronous loads: time spent waiting for the agent to have the chunks (off the
    engine step)."""
    async_copy_seconds: float = 0.0
    """Asynchronous loads: time spent copying arena → engine blocks (off the step)."""
    async_queue_seconds: float = 0.0
    """Asynchronous loads: time from vLLM handing the load over until the load thread
    started it."""

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_lock = threading.Lock()
_live: weakref.WeakSet[_Registered] = weakref.WeakSet()
_retired: dict[str, float] = {}


@dataclass(eq=False)
class _Registered:
    counters: ConnectorCounters = field(default_factory=ConnectorCounters)


def new_counters() -> _Registered:
    """Create counters that ``registry_snapshot`` will include."""
    holder = _Registered()
    with _lock:
        _live.add(holder)
    return holder


def retire(holder: _Registered) -> None:
    """Fold a closing connector's counters into the process totals."""
    with _lock:
        if holder in _live:
            _live.discard(holder)
            for name, value in holder.counters.as_dict().items():
                _retired[name] = _retired.get(name, 0) + value


_namespaces: dict[str, dict[str, Any]] = {}


def note_namespace(role: str, fields: dict[str, Any]) -> None:
    """Remember the rank-0 namespace a connector of ``role`` uses (for tests and tools)."""
    with _lock:
        _namespaces[role] = fields


def namespaces() -> dict[str, dict[str, Any]]:
    """Namespace fields by connector role, as noted by the connectors of this process."""
    with _lock:
        return dict(_namespaces)


def registry_snapshot() -> dict[str, float]:
    """Sum of the counters of every connector this process has created."""
    with _lock:
        total = dict.fromkeys((f.name for f in fields(ConnectorCounters)), 0.0)
        for name, value in _retired.items():
            total[name] += value
        for holder in list(_live):
            for name, value in holder.counters.as_dict().items():
                total[name] += value
    return total


class MeshKVConnectorStats(KVConnectorStats):
    """Counter increments of one interval, summed across workers and steps."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return {
            name: round(value, 4) if isinstance(value, float) else value
            for name, value in sorted(self.data.items())
        }

    def is_empty(self) -> bool:
        return not any(self.data.values())


PROM_HELP: dict[str, str] = {
    "lookups": "Lookup round trips to the meshkv agent (one per new request)",
    "lookup_errors": "Lookups that failed or missed their deadline (zero hits)",
    "hit_tokens": "Prompt tokens promised to vLLM as loadable from meshkv",
    "async_loads": "Requests whose chunks were loaded off the engine step (SSD or peer)",
    "reloads": "Preempted requests looked up and loaded again instead of computed",
    "loaded_chunks": "Chunks copied from the agent into the engine's KV cache",
    "loaded_bytes": "Bytes copied from the agent into the engine's KV cache",
    "load_errors": "Chunks promised but not loaded (missing, late or damaged): recomputed",
    "corrupt_chunks": "Loaded chunks whose bytes failed their checksum: recomputed",
    "verify_seconds": "Seconds spent hashing loaded chunks",
    "saved_chunks": "Chunks saved to the agent",
    "saved_bytes": "Bytes saved to the agent",
    "save_skipped": "Chunks not saved: the agent had no room or could not be reached",
    "save_duplicates": "Chunks the agent already held when saved (nothing copied)",
    "agent_unavailable": "Calls skipped or failed because the agent could not be reached",
    "agent_slow": "Agent calls that missed their deadline",
    "transfers_out": "Prefill requests that returned kv_transfer_params for a decode engine",
    "transfers_in": "Decode requests whose prompt KV came from a prefill engine's transfer",
    "transfer_tokens": "Prompt tokens promised to vLLM from prefill/decode transfers",
    "transfer_renewals": "Renewals of prefill engines' holds sent for queued decode requests",
    "transfers_abandoned": "Decode requests that ended before loading their transfer "
    "(the prefill engine's hold released at once)",
    "transfer_mismatches": "Decode requests whose prefill engine's KV is not this engine's "
    "(model, dtype, block size, TP size or drafter differ): computed here",
    "call_seconds": "Seconds spent in connector calls that talk to the agent or copy KV",
    "async_wait_seconds": "Seconds loads off the step waited for the agent's chunks",
    "async_copy_seconds": "Seconds loads off the step spent copying into the KV cache",
    "async_queue_seconds": "Seconds loads off the step waited for a load thread",
}
"""Help text of each ``ConnectorCounters`` field on the API server's ``/metrics``."""


class MeshKVPromMetrics(KVConnectorPromMetrics):
    """The connector's counters as Prometheus counters on the vLLM API server's
    ``/metrics`` (``vllm:meshkv_load_errors_total`` ...), one child per engine, fed by the
    increments vLLM collects each step through ``get_kv_connector_stats``."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._by_name: dict[str, dict[int, Any]] = {}
        for f in fields(ConnectorCounters):
            metric = self._counter_cls(
                name=f"vllm:meshkv_{f.name}",
                documentation=f"meshkv connector: {PROM_HELP.get(f.name, f.name)}",
                labelnames=labelnames,
            )
            self._by_name[f.name] = {  # one child per engine, as vLLM's own metrics have
                idx: metric.labels(*values) for idx, values in per_engine_labelvalues.items()
            }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            children = self._by_name.get(name)
            if children is not None and isinstance(value, int | float) and value > 0:
                children[engine_idx].inc(value)


def delta(now: dict[str, float], before: dict[str, float]) -> dict[str, Any]:
    """Non-zero increments between two ``as_dict`` snapshots."""
    out: dict[str, Any] = {}
    for name, value in now.items():
        diff = value - before.get(name, 0)
        if diff:
            out[name] = diff
    return out
