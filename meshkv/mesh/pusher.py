"""Copies of chunks sent to other nodes: replication and prefill/decode pushes.

Two kinds of work, one mechanism (``CHUNK_PUSH``: the chunk is read under a pin, sent
straight from the arena, and the pin is released when the send ends):

* **replication** (``--replicas R``): every chunk an engine of this node commits is copied
  to the first ``R - 1`` other members of the key's preference list on the ring, so the
  mesh holds R copies and losing any ``R - 1`` nodes loses no chunk. Chunks that arrived
  from a peer (pulls, pushes) are not pushed on again.
* **transfer pushes**: a prefill engine's chunks go straight to the decode node the request
  names, ahead of any replication, so the decode side finds them local.
* **repair** (``--replicas R`` after a member died or left): the node decides which copies
  to re-make (``MeshNode._repair``: it asks the keys' homes who still holds them) and
  queues them here with ``repair_push``, paced and never past half the background queue.

The receivers verify the record checksum, commit, and announce themselves to the key's
home like any holder. Pushing never blocks a commit: work waits in two bounded queues
(urgent first; the oldest is dropped and counted when full) drained by a few worker tasks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field

from meshkv.chunk import ChunkKey, NamespaceId, RecordHeader
from meshkv.errors import MeshKVError
from meshkv.mesh.seams import NodeView
from meshkv.store import Store
from meshkv.transport.framing import MsgKind

logger = logging.getLogger(__name__)

QUEUE_LIMIT = 4096
"""Most pushes waiting per queue; beyond it the oldest is dropped and counted."""
WORKERS = 4
"""Pushes running at once (the node has a few data connections per peer)."""
PUSH_OWNER = (1 << 62) + 4
"""Store owner of the pins held while a chunk is pushed."""
PUSH_LEASE_S = 30.0


@dataclass(frozen=True, slots=True)
class _Job:
    key: ChunkKey
    ns: NamespaceId | None
    """None: look the namespace up when the job runs (replication)."""
    target: str | None
    """None: the key's ring successors (replication)."""
    transfer: bool = False
    """A prefill/decode transfer push (counted apart)."""


@dataclass(slots=True)
class PushStats:
    pushed: int = 0
    """Copies the receiver stored."""
    skipped: int = 0
    """Copies the receiver already had (or had no room for)."""
    pushed_bytes: int = 0
    transfer_pushed: int = 0
    """Of ``pushed``: chunks of prefill/decode transfers."""
    repairs_scheduled: int = 0
    """Copies queued to restore ``--replicas`` after a member died or left."""
    repair_sweeps: int = 0
    """Repair sweeps run (one per ring change that lost members)."""
    failures: Counter[str] = field(default_factory=Counter)
    """Failed pushes by cause: transport, timeout, remote, gone, dropped."""


class Pusher:
    """Pushes chunks to other nodes; see the module docstring."""

    def __init__(self, node: NodeView, store: Store, *, replicas: int, timeout_s: float) -> None:
        self._node = node
        self._store = store
        self._replicas = replicas
        self._timeout = timeout_s
        self._urgent: collections.deque[_Job] = collections.deque()
        self._background: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._push_id = 0
        self.stats = PushStats()

    @property
    def queued(self) -> int:
        return len(self._urgent) + len(self._background)

    def replicate(self, key: ChunkKey) -> None:
        """Copy a chunk an engine just committed to its ring successors (background)."""
        if self._replicas > 1:
            self._enqueue(self._background, _Job(key, None, None))

    def push(self, ns: NamespaceId, keys: list[ChunkKey], target: str) -> None:
        """Copy ``keys`` to ``target`` now, ahead of replication (a transfer push)."""
        if target == self._node.node_id:
            return
        for key in keys:
            self._enqueue(self._urgent, _Job(key, ns, target, transfer=True))

    def _enqueue(self, queue: collections.deque[_Job], job: _Job) -> None:
        if len(queue) >= QUEUE_LIMIT:
            queue.popleft()
            self.stats.failures["dropped"] += 1
        queue.append(job)
        self._wake.set()
        self._workers = [w for w in self._workers if not w.done()]
        if len(self._workers) < WORKERS:
            self._workers.append(asyncio.create_task(self._run(), name="meshkv-push"))

    async def repair_push(self, key: ChunkKey, target: str) -> None:
        """Queue one copy that restores ``--replicas`` (background; waits while the queue
        is half full, so repair never pushes out replication or starves serving)."""
        while len(self._background) >= QUEUE_LIMIT // 2:
            await asyncio.sleep(0.05)
        self._enqueue(self._background, _Job(key, None, target))
        self.stats.repairs_scheduled += 1

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers.clear()

    async def _run(self) -> None:
        while True:
            queue = self._urgent or self._background
            if not queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            job = queue.popleft()
            try:
                await self._do(job)
            except MeshKVError as exc:
                logger.info("push of %s failed: %s", job.key.hex(), exc)

    async def _do(self, job: _Job) -> None:
        node, store = self._node, self._store
        ns = job.ns
        if ns is None:
            info = store.describe(job.key)
            if info is None:
                self.stats.failures["gone"] += 1
                return
            ns = NamespaceId(bytes.fromhex(info["namespace"]))
        targets = (
            [job.target] if job.target is not None else node.successors(job.key, self._replicas - 1)
        )
        for target in targets:
            await self._push(ns, job.key, target, transfer=job.transfer)

    async def _push(self, ns: NamespaceId, key: ChunkKey, target: str, *, transfer: bool) -> None:
        node, store = self._node, self._store
        address = node.address_of(target)
        if address is None:
            self.stats.failures["gone"] += 1
            return
        (pin,) = await store.read(ns, [key], PUSH_OWNER, PUSH_LEASE_S)
        if pin is None:
            self.stats.failures["gone"] += 1
            return
        loop = asyncio.get_running_loop()
        # Taken now, before any await: several workers push at once, and the receiver
        # matches each payload to its record by (sender, push id).
        self._push_id += 1
        push_id = self._push_id
        try:
            checksum = await store.checksum_for(pin)  # hashed now if deferred (store.hash)
            record = RecordHeader(ns, key, pin.num_tokens, pin.slot.length, checksum)
            deadline = loop.time() + self._timeout
            conn = await node.connection(address, deadline)
            reply = await conn.request(
                MsgKind.CHUNK_PUSH,
                {"push": push_id, "record": record.pack()},
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
            self.stats.transfer_pushed += int(transfer)
        else:
            self.stats.skipped += 1
