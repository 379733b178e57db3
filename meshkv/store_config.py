"""``StoreConfig``: the ``[store]`` table of the agent's configuration.

Flat on purpose (it is what the TOML table and the agent's flags fill in); it builds the
tiers' own typed configs, which validate their fields with their own messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshkv.errors import ConfigError
from meshkv.tiers.arena import SHM_DIR
from meshkv.tiers.cpu import CpuTierConfig
from meshkv.tiers.ssd import SsdTierConfig


@dataclass(slots=True)
class StoreConfig:
    """Configuration of the node's tiers (the ``[store]`` table of the agent's TOML)."""

    cpu_bytes: int = 4 << 30
    """CPU tier (shared-memory arena) size in bytes; rounded down to whole segments."""
    segment_bytes: int = 64 << 20
    """Arena segment size, a power of two; also the largest chunk accepted."""
    min_slot_bytes: int = 64 << 10
    """Smallest slot size class, a power of two >= 16 KiB."""
    eviction: str = "s3fifo"
    """CPU-tier eviction policy: ``s3fifo`` (scan-resistant) or ``lru``."""
    reserve_timeout_s: float = 60.0
    """A reservation not committed within this time is reclaimed."""
    max_lease_s: float = 600.0
    """Upper bound of a read lease."""
    max_leases: int = 1 << 16
    """Open read leases at most."""
    prefault: bool = True
    """Touch every arena page at start so the first copies run at memcpy speed."""
    shm_dir: str = SHM_DIR
    """tmpfs directory of the arena file."""
    ssd_dir: str | None = None
    """Directory of the SSD tier; None disables the tier."""
    ssd_bytes: int = 64 << 30
    """Cap on the SSD tier's file bytes (headers included)."""
    ssd_workers: int = 2
    """Disk I/O threads."""
    ssd_write_queue: int = 8
    """SSD writes admitted at once; a demotion beyond this is dropped (counted)."""
    ssd_fsync: bool = True
    """fsync every chunk file before publishing it by rename."""
    write_through: bool = False
    """Also write every committed chunk to SSD (default: write-back on eviction)."""
    writeback_headroom: float = 0.1
    """With an SSD tier, the fraction of the arena kept free by writing the coldest chunks
    to SSD ahead of demand (so stores rarely wait for, or lose, an eviction)."""
    persist_on_shutdown: bool = True
    """On close, write chunks that are only in memory to SSD so a restart keeps them."""
    verify_reads: bool = False
    """Re-hash arena bytes before handing out a read lease."""
    hash_workers: int = 1
    """Threads computing checksums of committed chunks."""

    def __post_init__(self) -> None:
        if self.ssd_dir is not None and not self.ssd_dir:
            raise ConfigError("store.ssd_dir must be a directory path or unset")
        if not 0.0 <= self.writeback_headroom < 1.0:
            raise ConfigError(
                f"store.writeback_headroom must be in [0, 1), got {self.writeback_headroom}"
            )
        if self.hash_workers <= 0:
            raise ConfigError(f"store.hash_workers must be positive, got {self.hash_workers}")
        self.cpu_config()  # validates the CPU fields with their own messages
        self.ssd_config()

    def cpu_config(self) -> CpuTierConfig:
        return CpuTierConfig(
            capacity_bytes=self.cpu_bytes,
            segment_bytes=self.segment_bytes,
            min_slot_bytes=self.min_slot_bytes,
            eviction=self.eviction,
            reserve_timeout_s=self.reserve_timeout_s,
            max_lease_s=self.max_lease_s,
            max_leases=self.max_leases,
            prefault=self.prefault,
            shm_dir=self.shm_dir,
        )

    def ssd_config(self) -> SsdTierConfig | None:
        if self.ssd_dir is None:
            return None
        return SsdTierConfig(
            directory=self.ssd_dir,
            capacity_bytes=self.ssd_bytes,
            workers=self.ssd_workers,
            write_queue_depth=self.ssd_write_queue,
            fsync=self.ssd_fsync,
        )
