"""``StoreConfig``: the ``[store]`` table of the agent's configuration.

A tree, not a copy: the store's own settings plus the tiers' configs as they are
(``[store.cpu]`` is a ``CpuTierConfig``, ``[store.ssd]`` an ``SsdTierConfig``; no SSD
table means no SSD tier). Each config validates its own fields with its own messages.

The flat keys of the first releases (``cpu_bytes``, ``ssd_dir``, ...) are still accepted
in a ``[store]`` table; ``LEGACY_KEYS`` says where each one lives now, and the TOML loader
reports a deprecation for every one it meets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshkv.errors import ConfigError
from meshkv.tiers.cpu import CpuTierConfig
from meshkv.tiers.ssd import SsdTierConfig

LEGACY_KEYS: dict[str, tuple[str, str]] = {
    "cpu_bytes": ("cpu", "capacity_bytes"),
    "segment_bytes": ("cpu", "segment_bytes"),
    "min_slot_bytes": ("cpu", "min_slot_bytes"),
    "eviction": ("cpu", "eviction"),
    "reserve_timeout_s": ("cpu", "reserve_timeout_s"),
    "max_lease_s": ("cpu", "max_lease_s"),
    "max_leases": ("cpu", "max_leases"),
    "prefault": ("cpu", "prefault"),
    "shm_dir": ("cpu", "shm_dir"),
    "ssd_dir": ("ssd", "directory"),
    "ssd_bytes": ("ssd", "capacity_bytes"),
    "ssd_workers": ("ssd", "workers"),
    "ssd_write_queue": ("ssd", "write_queue_depth"),
    "ssd_fsync": ("ssd", "fsync"),
}
"""Flat ``[store]`` key of releases <= 0.1 → (sub-table, field) where it lives now."""


@dataclass(slots=True)
class StoreConfig:
    """Configuration of the node's tiers (the ``[store]`` table of the agent's TOML)."""

    cpu: CpuTierConfig = field(default_factory=CpuTierConfig)
    """The CPU tier (the shared-memory arena): ``[store.cpu]``."""
    ssd: SsdTierConfig | None = None
    """The SSD tier: ``[store.ssd]``; None disables the tier."""
    write_through: bool = False
    """Also write every committed chunk to SSD (default: write-back on eviction)."""
    writeback_headroom: float = 0.1
    """With an SSD tier, the fraction of the arena kept free by writing the coldest chunks
    to SSD ahead of demand (so stores rarely wait for, or lose, an eviction)."""
    persist_on_shutdown: bool = True
    """On close, write chunks that are only in memory to SSD so a restart keeps them."""
    verify_reads: bool = False
    """Re-hash arena bytes before handing out a read lease."""
    hash_workers: int = 2
    """Threads computing checksums (chunks committed without one, received chunks being
    verified, chunks leaving the arena)."""

    def __post_init__(self) -> None:
        if not isinstance(self.cpu, CpuTierConfig):
            raise ConfigError(f"store.cpu must be a CpuTierConfig, got {type(self.cpu).__name__}")
        if self.ssd is not None and not isinstance(self.ssd, SsdTierConfig):
            raise ConfigError(f"store.ssd must be an SsdTierConfig, got {type(self.ssd).__name__}")
        if not 0.0 <= self.writeback_headroom < 1.0:
            raise ConfigError(
                f"store.writeback_headroom must be in [0, 1), got {self.writeback_headroom}"
            )
        if self.hash_workers <= 0:
            raise ConfigError(f"store.hash_workers must be positive, got {self.hash_workers}")

    @property
    def max_chunk_bytes(self) -> int:
        """Largest chunk the store accepts (one arena segment)."""
        return self.cpu.segment_bytes
