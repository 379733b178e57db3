"""Getting chunks that are not local: ask the home, pick a holder, pull into a slot.

A lookup from the local channel lands here for the keys the local store misses. The keys
are grouped by their home node and every home is asked at once (``DIR_LOOKUP``); the keys
that have holders are reported as tier ``peer`` and a pull is started for each of them,
so the engine can load asynchronously. A pull:

1. reserves a slot in the local store once the response header says how long the payload
   is, so the payload is received straight into the arena (no intermediate copy),
2. verifies the record header and the payload checksum (``RecordHeader.verify``),
3. commits with the verified checksum (the store's listener then announces this node as
   a new holder to the key's home).

One pull per key at a time (singleflight), every pull under a deadline, a failed holder
(dead, slow, corrupt) is skipped for the next, and a holder that says it no longer has the
chunk is reported to the home so the stale entry is dropped rather than retried forever.
Recompute by the engine is always the last resort: a pull that fails is a clean miss.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshkv.chunk import ChunkKey, NamespaceId, RecordHeader
from meshkv.errors import (
    ChecksumMismatch,
    DeadlineExceeded,
    MeshKVError,
    NamespaceMismatch,
    NoSpace,
    TransportError,
)
from meshkv.transport.framing import MsgKind

if TYPE_CHECKING:
    from meshkv.mesh.node import MeshNode

logger = logging.getLogger(__name__)

MESH_OWNER = (1 << 62) + 1
"""Store owner id of reservations made by pulls (never a local connection id)."""

MAX_INFLIGHT_PULLS = 1024
"""Most pulls queued or running at once; further lookups report the key as a miss."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds (seconds) of the pull latency histogram."""


@dataclass(slots=True)
class FetchStats:
    """Counters of the fetch path (read by the metrics module and ``/v1/ring``)."""

    lookups: int = 0
    """Local-miss lookups sent through the mesh."""
    lookup_keys: int = 0
    """Keys asked of homes."""
    peer_hits: int = 0
    """Keys a home reported holders for."""
    pulls_started: int = 0
    pulls_ok: int = 0
    pull_bytes: int = 0
    """Payload bytes pulled and committed."""
    failures: Counter[str] = field(default_factory=Counter)
    """Failed pull attempts by cause: timeout, transport, checksum, stale, no_space,
    remote, dropped (pull queue full), exhausted (no holder left)."""
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    """Pull latency histogram counts (last bucket is +Inf)."""
    latency_sum: float = 0.0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency_buckets[i] += 1
                break
        else:
            self.latency_buckets[-1] += 1
        self.latency_sum += seconds


class Fetcher:
    """Lookups through homes and pulls from holders, for one agent."""

    def __init__(self, node: MeshNode) -> None:
        self._node = node
        self._store = node.store
        self._inflight: dict[ChunkKey, asyncio.Task[bool]] = {}
        self._semaphore = asyncio.Semaphore(node.config.max_concurrent_pulls)
        self._rng = random.Random()
        self.stats = FetchStats()
        self.load: Counter[str] = Counter()
        """Pull attempts running per holder (the least loaded holder is tried first)."""

    # --- lookups ----------------------------------------------------------------------

    async def locate(
        self, ns: NamespaceId, keys: Sequence[ChunkKey], deadline: float
    ) -> dict[ChunkKey, tuple[str, ...]]:
        """Holders (node ids other than this one) of each key, asking every home at once.

        A home that cannot be reached by ``deadline`` contributes no holders: the key is a
        miss, never an error for the caller.
        """
        self.stats.lookups += 1
        self.stats.lookup_keys += len(keys)
        by_home: dict[str, list[ChunkKey]] = {}
        for key, home in zip(keys, self._node.homes(keys), strict=True):
            by_home.setdefault(home, []).append(key)
        results = await asyncio.gather(
            *(self._node.lookup_at(home, group, deadline) for home, group in by_home.items()),
            return_exceptions=True,
        )
        found: dict[ChunkKey, tuple[str, ...]] = {}
        me = self._node.node_id
        for (home, group), result in zip(by_home.items(), results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, MeshKVError | TimeoutError | OSError):
                    raise result
                logger.debug("lookup at home %s failed: %s", home, result)
                self.stats.failures["lookup"] += 1
                continue
            for key, holders in zip(group, result, strict=True):
                live = tuple(h for h in holders if h != me and self._node.is_alive(h))
                if live:
                    found[key] = live
        self.stats.peer_hits += len(found)
        return found

    # --- pulls ------------------------------------------------------------------------

    def start(
        self,
        ns: NamespaceId,
        key: ChunkKey,
        holders: Sequence[str],
        deadline: float | None = None,
    ) -> bool:
        """Start (or join) the pull of ``key``, ending by ``deadline`` at the latest
        (and within ``pull_timeout_s``); False if the pull queue is full."""
        if key in self._inflight:
            return True
        if len(self._inflight) >= MAX_INFLIGHT_PULLS:
            self.stats.failures["dropped"] += 1
            return False
        limit = asyncio.get_running_loop().time() + self._node.config.pull_timeout_s
        deadline = limit if deadline is None else min(deadline, limit)
        task = asyncio.create_task(self._pull(ns, key, list(holders), deadline))
        self._inflight[key] = task
        task.add_done_callback(functools.partial(self._pull_done, key))
        self.stats.pulls_started += 1
        return True

    def _pull_done(self, key: ChunkKey, task: asyncio.Task[bool]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    def pending(self, key: ChunkKey) -> bool:
        return key in self._inflight

    async def wait(self, keys: Sequence[ChunkKey], deadline: float) -> None:
        """Wait until the pulls of ``keys`` (those in flight) end, or ``deadline``."""
        tasks = [self._inflight[k] for k in keys if k in self._inflight]
        if not tasks:
            return
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)

    async def fetch(
        self, ns: NamespaceId, keys: Sequence[ChunkKey], deadline: float
    ) -> dict[ChunkKey, bool]:
        """Locate and pull ``keys`` now, waiting for the pulls up to ``deadline``."""
        found = await self.locate(ns, keys, deadline)
        for key, holders in found.items():
            self.start(ns, key, holders, deadline)
        await self.wait(list(found), deadline)
        return {k: self._node.store.lookup(ns, [k])[0] is not None for k in keys}

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)

    async def _pull(
        self, ns: NamespaceId, key: ChunkKey, holders: list[str], deadline: float
    ) -> bool:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout_at(deadline):
                async with self._semaphore:
                    ordered = self._order(holders)
                    for i, holder in enumerate(ordered):
                        if self._store.lookup(ns, [key])[0] is not None:
                            return True  # arrived meanwhile (a push, another engine)
                        last = i == len(ordered) - 1
                        cause = await self._pull_from(ns, key, holder, deadline, last=last)
                        if cause is None:
                            self.stats.pulls_ok += 1
                            self.stats.observe(loop.time() - started)
                            return True
                        self.stats.failures[cause] += 1
                        logger.info("pull of %s from %s failed: %s", key.hex(), holder, cause)
        except TimeoutError:
            self.stats.failures["timeout"] += 1
            return False
        self.stats.failures["exhausted"] += 1
        return False

    def _order(self, holders: list[str]) -> list[str]:
        """Least loaded first (requests in flight to the holder), random among equals."""
        self._rng.shuffle(holders)
        return sorted(holders, key=self._node.peer_load)

    async def _pull_from(
        self, ns: NamespaceId, key: ChunkKey, holder: str, deadline: float, *, last: bool
    ) -> str | None:
        """One attempt; returns None on success, else the cause of failure. While other
        holders remain, a slow holder gets ``holder_timeout_s``; the last one gets what is
        left of the pull's deadline."""
        node = self._node
        address = node.address_of(holder)
        if address is None or not node.is_alive(holder):
            return "dead"
        reserved: list[bool] = []
        store = self._store

        def recv_into(kind: MsgKind, header: Mapping[str, Any], length: int) -> memoryview | None:
            slot = store.reserve(ns, key, length, MESH_OWNER)
            if slot is None:
                return None  # stored meanwhile: the bytes land in scratch memory
            reserved.append(True)
            return store.payload(slot)

        loop = asyncio.get_running_loop()
        attempt_deadline = (
            deadline if last else min(deadline, loop.time() + node.config.holder_timeout_s)
        )
        self.load[holder] += 1
        try:
            conn = await node.connection(address, attempt_deadline)
            reply = await conn.request(
                MsgKind.CHUNK_GET,
                {"ns": bytes(ns), "key": bytes(key)},
                deadline=attempt_deadline,
                recv_into=recv_into,
            )
        except NoSpace:
            return "no_space"
        except (DeadlineExceeded, TimeoutError):
            self._abort(ns, key, reserved)
            return "timeout"
        except TransportError:
            self._abort(ns, key, reserved)
            return "transport"
        except MeshKVError as exc:
            self._abort(ns, key, reserved)
            logger.info("holder %s refused %s: %s", holder, key.hex(), exc)
            return "remote"
        finally:
            self.load[holder] -= 1
            if self.load[holder] <= 0:
                del self.load[holder]
        if not reply.header.get("found"):
            # The holder dropped the chunk; it tells the home itself (``not_held``), so
            # the entry is corrected there rather than handed out again.
            self._abort(ns, key, reserved)
            return "stale"
        try:
            record = RecordHeader.unpack(reply.header.get("record", b""))
            if record.key != key:
                raise ChecksumMismatch("record is for another key")
            record.verify(reply.payload if reply.payload is not None else b"", ns)
        except (ChecksumMismatch, NamespaceMismatch) as exc:
            self._abort(ns, key, reserved)
            logger.warning("pull of %s from %s rejected: %s", key.hex(), holder, exc)
            return "checksum"
        if not reserved:
            return None  # another path stored it while the bytes were in flight
        node.mark_arrived(key)
        store.commit(ns, key, MESH_OWNER, record.num_tokens, record.checksum)
        self.stats.pull_bytes += record.payload_len
        return None

    def _abort(self, ns: NamespaceId, key: ChunkKey, reserved: list[bool]) -> None:
        if reserved:
            reserved.clear()
            try:
                self._store.abort(ns, key, MESH_OWNER)
            except MeshKVError as exc:
                logger.debug("abort of %s after a failed pull: %s", key.hex(), exc)
