"""Replication: copies of locally committed chunks on the key's ring successors.

With ``--replicas R`` every chunk an engine commits on this node is pushed
(``CHUNK_PUSH``) to the first ``R - 1`` other members of the key's preference list on the
ring, so the mesh holds R copies and losing any ``R - 1`` nodes loses no chunk. Chunks that
arrived from a peer (pulls, pushes) are not pushed on again. The receivers verify the
record checksum, commit, and announce themselves to the key's home like any holder.

Pushing never blocks a commit: keys wait in a bounded queue (oldest dropped and counted
when full) drained by one task; each push reads the chunk under a pin, sends it straight
from the arena, and releases the pin when the send ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshkv.chunk import ChunkKey, NamespaceId, RecordHeader
from meshkv.errors import MeshKVError
from meshkv.transport.framing import MsgKind

if TYPE_CHECKING:
    from meshkv.mesh.node import MeshNode

logger = logging.getLogger(__name__)

QUEUE_LIMIT = 4096
"""Most chunks waiting to be replicated; beyond it the oldest is dropped and counted."""
PUSH_OWNER = (1 << 62) + 4
"""Store owner of the pins held while a chunk is pushed."""
PUSH_LEASE_S = 30.0


@dataclass(slots=True)
class ReplicationStats:
    pushed: int = 0
    """Copies the receiver stored."""
    skipped: int = 0
    """Copies the receiver already had (or had no room for)."""
    pushed_bytes: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    """Failed pushes by cause: transport, timeout, remote, gone, dropped."""


class Replicator:
    """Pushes locally committed chunks to ``replicas - 1`` ring successors."""

    def __init__(self, node: MeshNode) -> None:
        self._node = node
        self._queue: collections.deque[ChunkKey] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._push_id = 0
        self.stats = ReplicationStats()

    def enqueue(self, keys: list[ChunkKey]) -> None:
        for key in keys:
            if len(self._queue) >= QUEUE_LIMIT:
                self._queue.popleft()
                self.stats.failures["dropped"] += 1
            self._queue.append(key)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="meshkv-replicate")

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            key = self._queue.popleft()
            try:
                await self._replicate(key)
            except MeshKVError as exc:
                logger.info("replication of %s failed: %s", key.hex(), exc)

    async def _replicate(self, key: ChunkKey) -> None:
        node = self._node
        targets = [n for n in node.ring.owners(key, node.config.replicas + 1) if n != node.node_id][
            : node.config.replicas - 1
        ]
        if not targets:
            return
        info = node.store.describe(key)
        if info is None:
            self.stats.failures["gone"] += 1
            return
        ns = NamespaceId(bytes.fromhex(info["namespace"]))
        for target in targets:
            await self._push(ns, key, target)

    async def _push(self, ns: NamespaceId, key: ChunkKey, target: str) -> None:
        node = self._node
        store = node.store
        address = node.address_of(target)
        if address is None:
            self.stats.failures["gone"] += 1
            return
        (pin,) = await store.read(ns, [key], PUSH_OWNER, PUSH_LEASE_S)
        if pin is None:
            self.stats.failures["gone"] += 1
            return
        loop = asyncio.get_running_loop()
        try:
            checksum = await store.checksum_for(pin)  # hashed off the loop if deferred
            record = RecordHeader(ns, key, pin.num_tokens, pin.slot.length, checksum)
            self._push_id += 1
            deadline = loop.time() + node.config.pull_timeout_s
            conn = await node.connection(address, deadline)
            reply = await conn.request(
                MsgKind.CHUNK_PUSH,
                {"push": self._push_id, "record": record.pack()},
                store.payload(pin.slot),
                deadline=deadline,
            )
        except TimeoutError:
            self.stats.failures["timeout"] += 1
            return
        except MeshKVError as exc:
            self.stats.failures["transport"] += 1
            logger.info("push of %s to %s failed: %s", key.hex(), target, exc)
            return
        finally:
            with contextlib.suppress(MeshKVError):
                store.release([pin.lease_id], PUSH_OWNER)
        if reply.header.get("stored"):
            self.stats.pushed += 1
            self.stats.pushed_bytes += pin.slot.length
        else:
            self.stats.skipped += 1
