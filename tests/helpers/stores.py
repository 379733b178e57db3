"""Store configs for tests, written with the short flat names (``cpu_bytes``, ``ssd_dir``).

The package's ``StoreConfig`` is a tree (``cpu: CpuTierConfig``, ``ssd: SsdTierConfig``);
tests build many small ones, so this maps the flat names (``LEGACY_KEYS``, the same table
the TOML loader uses for old configs) onto it.
"""

from __future__ import annotations

from typing import Any

from meshkv.chunk import ChunkKey
from meshkv.store_config import LEGACY_KEYS, StoreConfig
from meshkv.tiers.cpu import CpuTierConfig
from meshkv.tiers.ssd import SsdTierConfig


def store_config(**flat: Any) -> StoreConfig:
    cpu: dict[str, Any] = {}
    ssd: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for name, value in flat.items():
        if name in LEGACY_KEYS:
            sub, field = LEGACY_KEYS[name]
            (cpu if sub == "cpu" else ssd)[field] = value
        else:
            own[name] = value
    if ssd.get("directory") is None:
        ssd = {}
    return StoreConfig(cpu=CpuTierConfig(**cpu), ssd=SsdTierConfig(**ssd) if ssd else None, **own)


class Recorder:
    """A ``StoreListener`` that writes down what it is told."""

    def __init__(self) -> None:
        self.added: list[ChunkKey] = []
        self.from_engine: list[bool] = []
        self.dropped_keys: list[ChunkKey] = []
        self.aborted_keys: list[ChunkKey] = []

    def committed(self, key: ChunkKey, from_engine: bool) -> None:
        self.added.append(key)
        self.from_engine.append(from_engine)

    def dropped(self, keys: list[ChunkKey]) -> None:
        self.dropped_keys.extend(keys)

    def aborted(self, key: ChunkKey) -> None:
        self.aborted_keys.append(key)
