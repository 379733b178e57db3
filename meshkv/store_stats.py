"""``StoreStats``: the store's counters and gauges, as plain numbers.

The agent renders a snapshot as JSON (``/v1/status``) and maps it to ``meshkv_*`` metrics;
nothing here imports a metrics library.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TierStats:
    """Counters (monotonic) and gauges of one tier."""

    chunks: int = 0
    usage_bytes: int = 0
    capacity_bytes: int = 0
    hit_chunks: int = 0
    """Chunks served by ``read`` from this tier."""
    stored_bytes: int = 0
    """Payload bytes committed (cpu) or written incl. headers (ssd)."""
    loaded_bytes: int = 0
    """Bytes served by reads (cpu: pinned payloads; ssd: file bytes read)."""
    evictions: dict[str, int] = field(default_factory=dict)
    """Chunks that left the tier, by reason (capacity, demoted, checksum, clear)."""


@dataclass(slots=True)
class StoreStats:
    """A snapshot of the store's counters and gauges (plain numbers)."""

    arena_name: str = ""
    tiers: dict[str, TierStats] = field(default_factory=dict)
    lookups: int = 0
    lookup_keys: int = 0
    read_keys: int = 0
    miss_chunks: int = 0
    namespace_mismatches: int = 0
    leases_open: int = 0
    pinned_chunks: int = 0
    reservations_open: int = 0
    leases_expired: int = 0
    reservations_expired: int = 0
    leases_overdue: int = 0
    fenced_slots: int = 0
    late_commits: int = 0
    checksum_failures: int = 0
    checksums_pending: int = 0
    demotions: int = 0
    demotions_dropped: int = 0
    promotions: int = 0
    promotion_failures: int = 0
    ssd_degraded: bool = False
    ssd_write_errors: int = 0
    ssd_read_errors: int = 0
    ssd_writes_refused: int = 0
    ssd_direct_writes: int = 0
    ssd_direct_reads: int = 0
    ssd_partial_removed: int = 0
    ssd_corrupt_removed: int = 0
