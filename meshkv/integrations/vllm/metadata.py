"""What the scheduler-side connector tells the worker-side connector each step.

Keys are computed by the scheduler for every tensor-parallel rank (``keys[rank]``), so a
worker never hashes tokens; with TP=1 there is one key per chunk.
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
    num_blocks: int
    """Engine blocks the stored chunk holds (fewer than a full chunk's for a prompt's
    last, partial chunk): its payload size is this many blocks."""


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """All chunks one request loads in this step, in prefix order."""

    req_id: str
    chunks: tuple[ChunkLoad, ...]
    is_async: bool
    """True: chunks may still be on a peer (or SSD); the worker waits up to ``wait_s`` off
    the step and reports the request through ``get_finished``."""
    wait_s: float = 0.0
    """How long the load waits for its chunks to be in the agent's memory: off the step
    (asynchronous), or inside it for chunks promoted from this node's SSD."""

    def block_ids(self) -> list[int]:
        return [block for chunk in self.chunks for _, block in chunk.blocks]


@dataclass(frozen=True, slots=True)
class ChunkSave:
    """One chunk to copy from engine blocks into the agent."""

    keys: tuple[ChunkKey, ...]
    """The chunk's key for each TP rank."""
    block_ids: tuple[int, ...]
    """Every engine block of the chunk, in token order."""
    index: int
    """Position of the chunk in the request (0 = first ``chunk_tokens`` tokens)."""
    num_tokens: int
    """Tokens the chunk covers (``chunk_tokens``, or fewer for a prompt's last chunk)."""


@dataclass(frozen=True, slots=True)
class HoldSpec:
    """Prefill side: pin a transfer's chunks in the agent (and push them to the decode node)."""

    transfer_id: str
    keys: tuple[tuple[ChunkKey, ...], ...]
    """Every chunk of the prompt, per rank (``keys[i][rank]``)."""
    hold_s: float
    push_to: str | None


@dataclass(frozen=True, slots=True)
class SaveSpec:
    """The new chunks of one request after this step's forward pass."""

    req_id: str
    chunks: tuple[ChunkSave, ...]
    hold: HoldSpec | None = None
    """Set on the prefill of a transfer once its whole prompt is saved."""
    transfer: bool = False
    """The chunks are a prefill/decode transfer's (the worker waits longer for them)."""


@dataclass(slots=True)
class MeshKVConnectorMetadata(KVConnectorMetadata):
    """Per-step instructions from the scheduler to the workers."""

    chunk_tokens: int
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.loads and not self.saves
