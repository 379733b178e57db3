"""vLLM KV events for what the connector saved into meshkv.

With vLLM's ``--kv-events-config '{"enable_kv_cache_events": true, ...}'`` the engine
publishes a ``KVEventBatch`` stream (ZMQ PUB, msgpack, topic and sequence numbers, a
replay socket) that cache-aware routers consume: llm-d's precise prefix-cache scorer,
Dynamo's KV router. The meshkv connector adds its own ``BlockStored`` events to that
stream (through ``take_events``, which the scheduler publishes with its own), so a router
learns which prompt blocks this engine can load from its node's meshkv tier even after
they left the engine's own cache.

Each event describes the vLLM blocks of one saved chunk the way vLLM's block pool does
(the engine's own block hashes, the parent hash, token ids, block size, LoRA, extra keys),
with ``medium="CPU"`` (the agent's arena) and ``ownership="meshkv"``. It is published only
once the agent has confirmed the chunk (the commit answered, on every tensor-parallel
rank): the worker reports committed chunks in ``KVConnectorOutput.kv_cache_events`` and the
scheduler turns them into events.

Tier moves: when a lookup finds a published chunk in another of the node's tiers than
the one it was published in (demoted to SSD, promoted back), the move is published as
vLLM's block pool would: ``BlockRemoved`` from the old medium, ``BlockStored`` in the new
(``CPU`` for the arena, ``STORAGE`` for the SSD tier).

Removals: the connector does not see the agent's evictions as they happen, but it sees
their effect. When a lookup finds that a chunk it published is no longer anywhere the
node can load from (not in its tiers, on no peer, not in the remote tier), the scheduler
publishes a ``BlockRemoved`` for that chunk's blocks (same hashes, medium, ownership), so
the router stops counting on them. A router that sent a request here because of a stale
``BlockStored`` learns of it from that very request; a chunk never asked for again is
never reported removed (the connector remembers the last ``MAX_PUBLISHED`` chunks it
published).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec
from vllm.distributed.kv_events import (
    MEDIUM_CPU,
    MEDIUM_STORAGE,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVConnectorKVEvents,
)

from meshkv.chunk import ChunkKey

TIER_MEDIUM = {"cpu": MEDIUM_CPU, "ssd": MEDIUM_STORAGE}
"""The vLLM event medium of a chunk in each of the node's own tiers."""

OWNERSHIP = "meshkv"
"""``ownership`` of meshkv's events: "secondary offloading tier identifier"."""

SavedChunk = tuple[str, int]
"""``(request id, chunk index)`` of a chunk the agent committed."""


class SavedChunks(KVConnectorKVEvents):
    """Worker → scheduler: chunks this worker's agent committed since the last step.

    vLLM concatenates the reports of the workers of one step; the scheduler counts them
    (``EventLog.confirm``): a chunk is saved once every tensor-parallel rank reported it,
    in the same step or not."""

    def __init__(self, chunks: Iterable[SavedChunk] = (), workers: int = 1) -> None:
        self._chunks: list[SavedChunk] = list(chunks)
        self._workers = workers

    def add_events(self, events: list[Any]) -> None:
        self._chunks.extend(events)

    def aggregate(self) -> SavedChunks:
        return self  # counted per chunk across steps by EventLog.confirm

    def increment_workers(self, count: int = 1) -> None:
        self._workers += count

    def get_all_events(self) -> list[Any]:
        return list(self._chunks)

    def get_number_of_workers(self) -> int:
        return self._workers

    def clear_events(self) -> None:
        self._chunks = []

    def __reduce__(self) -> tuple[Any, ...]:  # crosses the worker → engine-core boundary
        return (SavedChunks, (self._chunks, self._workers))


def publishes_kv_events(vllm_config: Any) -> bool:
    """Whether the engine publishes KV events (``--kv-events-config``), so the connector's
    are wanted."""
    config = getattr(vllm_config, "kv_events_config", None)
    return bool(config is not None and getattr(config, "enable_kv_cache_events", False))


class EventLog:
    """Scheduler side: the ``BlockStored`` event of every chunk planned for saving, held
    until the workers confirm its commit, then handed to ``take_events``; and the
    ``BlockRemoved`` of a published chunk a lookup found gone."""

    MAX_PLANNED = 65536
    """Planned events kept (oldest dropped first); a chunk whose commit never comes (the
    save was skipped) must not be kept for ever."""
    MAX_PUBLISHED = 65536
    """Published chunks remembered (key → block hashes) to report their removal."""
    AWAIT_S = 2.0
    """How long an idle engine is kept stepping for a planned chunk's commit
    (``awaiting``). A commit lands within milliseconds of its step; a save that was
    skipped never confirms, and costs at most this much stepping."""

    def __init__(self, ranks: int = 1) -> None:
        self.ranks = ranks
        """Tensor-parallel ranks that must each confirm a chunk."""
        self._planned: collections.OrderedDict[SavedChunk, list[Any]] = (
            collections.OrderedDict()
        )  # chunk -> [event, confirmations so far, rank-0 key, when planned]; oldest first
        self._published: collections.OrderedDict[ChunkKey, BlockStored] = collections.OrderedDict()
        self._ready: list[KVCacheEvent] = []

    def plan(self, req_id: str, index: int, event: BlockStored, key: ChunkKey) -> None:
        """``event`` describes chunk ``index`` of ``req_id``, whose rank-0 key is ``key``."""
        self._planned[(req_id, index)] = [event, 0, key, time.monotonic()]
        self._planned.move_to_end((req_id, index))
        while len(self._planned) > self.MAX_PLANNED:
            self._planned.popitem(last=False)

    def confirm(self, output: SavedChunks) -> None:
        for req_id, index in output.get_all_events():
            entry = self._planned.get((req_id, index))
            if entry is None:
                continue
            entry[1] += 1
            if entry[1] >= self.ranks:
                del self._planned[(req_id, index)]
                event, _, key, _ = entry
                self._ready.append(event)
                self._published[key] = event
                self._published.move_to_end(key)
                while len(self._published) > self.MAX_PUBLISHED:
                    self._published.popitem(last=False)

    def awaiting(self) -> bool:
        """Whether a chunk planned less than ``AWAIT_S`` ago waits for its commit. The
        workers report commits only in a step's output, and an engine whose requests have
        all finished takes no more steps: without this the last request's chunks were
        published only when the next request came (vLLM keeps stepping while the
        connector's ``has_pending_push_work`` says so)."""
        if not self._planned:
            return False
        newest = next(reversed(self._planned.values()))  # plans are kept in plan order
        return bool(newest[3] >= time.monotonic() - self.AWAIT_S)

    def gone(self, keys: Iterable[ChunkKey]) -> None:
        """A lookup found ``keys`` (rank-0) nowhere: report the published ones removed."""
        published = self._published
        if not published:
            return
        for key in keys:
            event = published.pop(key, None)
            if event is not None:
                self._ready.append(
                    BlockRemoved(
                        block_hashes=list(event.block_hashes),
                        medium=event.medium,
                        ownership=event.ownership,
                    )
                )

    def seen(self, key: ChunkKey, tier: str | None) -> None:
        """A lookup found published chunk ``key`` (rank-0) in ``tier``: when that is another
        medium than the one published (demoted to SSD, promoted back), publish the move as
        vLLM's block pool would: ``BlockRemoved`` from the old medium, ``BlockStored`` in
        the new one. Chunks found on a peer or in the remote tier keep their medium."""
        medium = TIER_MEDIUM.get(tier) if tier is not None else None
        event = self._published.get(key) if medium is not None else None
        if event is None or event.medium == medium:
            return
        self._ready.append(
            BlockRemoved(
                block_hashes=list(event.block_hashes),
                medium=event.medium,
                ownership=event.ownership,
            )
        )
        moved = msgspec.structs.replace(event, medium=medium)
        self._published[key] = moved
        self._ready.append(moved)

    def take(self) -> Iterator[KVCacheEvent]:
        ready, self._ready = self._ready, []
        yield from ready


def chunk_event(request: Any, index: int, chunk_tokens: int, block_size: int) -> BlockStored | None:
    """The ``BlockStored`` of chunk ``index`` of ``request`` (its full vLLM blocks), built
    like vLLM's block pool builds its own; None when vLLM has not hashed those blocks."""
    from vllm.v1.core.kv_cache_utils import (
        generate_block_hash_extra_keys,
        maybe_convert_block_hash,
        to_event_extra_keys,
    )

    first = index * chunk_tokens // block_size
    last = (index + 1) * chunk_tokens // block_size
    hashes = list(request.block_hashes[first:last])
    if len(hashes) < last - first or not hashes:
        return None
    parent = maybe_convert_block_hash(request.block_hashes[first - 1]) if first else None
    extra: list[tuple[Any, ...] | None] = []
    mm_index = 0
    for b in range(first, last):
        keys, mm_index = generate_block_hash_extra_keys(
            request, b * block_size, (b + 1) * block_size, mm_index
        )
        extra.append(keys)
    lora = getattr(request, "lora_request", None)
    return BlockStored(
        block_hashes=[maybe_convert_block_hash(h) for h in hashes],
        parent_block_hash=parent,
        token_ids=list(request.all_token_ids[first * block_size : last * block_size]),
        block_size=block_size,
        lora_id=lora.adapter_id if lora else None,
        medium=MEDIUM_CPU,
        lora_name=lora.name if lora else None,
        extra_keys=to_event_extra_keys(extra),
        ownership=OWNERSHIP,
        session_id=getattr(request, "session_id", None),
    )
