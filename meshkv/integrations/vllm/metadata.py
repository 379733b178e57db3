"""What the scheduler-side connector tells the worker-side connector each step.

Keys are computed by the scheduler for every tensor-parallel rank (``keys[rank][i]``), so
a worker never hashes tokens; with TP=1 there is one list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from meshkv.chunk import ChunkKey


@dataclass(frozen=True, slots=True)
class ChunkLoad:
    """One chunk to copy from the agent into engine blocks."""

    keys: tuple[ChunkKey, ...]
    """The chunk's key for each TP rank."""
    blocks: tuple[tuple[int, int], ...]
    """``(block index inside the chunk, engine block id)`` for each block to write; blocks
    that vLLM already computed itself are left out."""


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """All chunks one request loads in this step, in prefix order."""

    req_id: str
    chunks: tuple[ChunkLoad, ...]
    is_async: bool
    """True: chunks may still be on SSD or a peer; the worker waits up to its deadline
    off the step and reports the request through ``get_finished``."""

    def block_ids(self) -> list[int]:
        return [block for chunk in self.chunks for _, block in chunk.blocks]


@dataclass(frozen=True, slots=True)
class ChunkSave:
    """One full chunk to copy from engine blocks into the agent."""

    keys: tuple[ChunkKey, ...]
    """The chunk's key for each TP rank."""
    block_ids: tuple[int, ...]
    """Every engine block of the chunk, in token order."""
    index: int
    """Position of the chunk in the request (0 = first ``chunk_tokens`` tokens)."""


@dataclass(frozen=True, slots=True)
class SaveSpec:
    """The new full chunks of one request after this step's forward pass."""

    req_id: str
    chunks: tuple[ChunkSave, ...]


@dataclass(slots=True)
class MeshKVConnectorMetadata(KVConnectorMetadata):
    """Per-step instructions from the scheduler to the workers."""

    chunk_tokens: int
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.loads and not self.saves
