"""What the connector's side tests share: a tiny engine layout and a connector config."""

from __future__ import annotations

from typing import Any

from meshkv.integrations.vllm.config import ConnectorConfig
from meshkv.integrations.vllm.layout import EngineLayout

BS = 16  # engine block size
CHUNK = 64  # tokens per chunk: 4 blocks
LAYOUT = EngineLayout(
    model="tiny", dtype="bfloat16", layer_names=("l0", "l1"), num_kv_heads=2, head_size=32,
    block_size=BS, packing="test", tp_size=1, cache_salt="",
)  # fmt: skip


def config(**kw: Any) -> ConnectorConfig:
    return ConnectorConfig.from_extra_config(
        {"socket": "/nowhere", "chunk_tokens": CHUNK, **kw}, {}
    )


def tokens(n: int, seed: int = 1) -> list[int]:
    return [(seed * 7919 + i * 104729) % 1000 + 3 for i in range(n)]
