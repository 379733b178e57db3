"""The mesh as a chunk source: ask the homes who holds a key, pull it from one holder.

``Fetcher`` is the ``meshkv.puller.ChunkSource`` the node registers with the puller. It has
no map of work in flight (single-flight, deadlines and the order of steps belong to the
puller); it does the two network steps:

* ``locate``: group keys by their home node and ask every home at once (``DIR_LOOKUP``);
  a home that cannot be reached by the deadline contributes no holders: the key is a miss,
  never an error for the caller.
* ``pull``: one attempt at one holder. It reserves a slot in the local store once the
  response header says how long the payload is, so the payload is received straight into
  the arena (no intermediate copy), verifies the record header and the payload checksum,
  and commits with the verified checksum (the store's listeners then announce this node as
  a new holder). A holder that says it no longer has the chunk has already corrected the
  home (``not_held``), so the entry is not handed out again. Until that correction has
  had time to land, this node does not ask the same holder for the same key again
  (``NOT_FOUND_MEMORY_S``): without it, a lookup's flight and a read right behind it
  could both pull from the stale holder.

It also keeps the load per holder (pulls running to each), so the least loaded is tried
first, and sends ``TRANSFER_DONE`` to the producer of a prefill/decode transfer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshkv.chunk import ChunkKey, NamespaceId, RecordHeader
from meshkv.errors import (
    ChecksumMismatch,
    DeadlineExceeded,
    MeshKVError,
    NamespaceMismatch,
    NoSpace,
    NotReserved,
    TransportError,
)
from meshkv.latency import LatencyHistogram
from meshkv.mesh.seams import NodeView
from meshkv.store import Store
from meshkv.transport.framing import KIND_SINCE, MsgKind

logger = logging.getLogger(__name__)

MESH_OWNER = (1 << 62) + 1
"""Store owner id of reservations made by pulls (never a local connection id)."""
DONE_TIMEOUT_S = 2.0
"""Deadline of one ``TRANSFER_DONE`` attempt (it is tried twice)."""
RENEW_BATCH = 256
"""Transfers named in one ``TRANSFER_RENEW`` (the peer server takes 1024; 256 ids of up to
128 characters stay well inside a frame's 64 KiB header)."""
MAX_DONE_TASKS = 1024
"""``TRANSFER_DONE`` messages in flight at once; beyond it they are dropped (the producer's
hold then ends at its deadline instead)."""
NOT_FOUND_MEMORY_S = 1.0
"""Seconds a holder's 'not found' for a key is remembered, so the key's next lookup skips
that holder while its correction travels to the home (one message: milliseconds). A holder
that was only late with its commit is skipped for that long: a miss, never wrong bytes."""
NOT_FOUND_MEMORY_MAX = 4096
"""(key, holder) answers remembered at most; the oldest are forgotten first."""


@dataclass(slots=True)
class FetchStats:
    """Counters of the network steps (read by the metrics module and ``/v1/ring``)."""

    lookups: int = 0
    """Lookups sent through the mesh (one per batch of keys)."""
    lookup_keys: int = 0
    """Keys asked of homes."""
    peer_hits: int = 0
    """Keys a home reported live holders for."""
    pulls_ok: int = 0
    pull_bytes: int = 0
    """Payload bytes pulled and committed."""
    failures: Counter[str] = field(default_factory=Counter)
    """Failed attempts by cause: lookup, dead, timeout, transport, checksum, stale, expired,
    no_space, remote."""
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    """Seconds of successful pull attempts, request sent to commit."""
    renewals: int = 0
    """Transfer holds this node asked their producers to renew."""


class Fetcher:
    """Lookups through homes and single pull attempts, for one node."""

    def __init__(
        self, node: NodeView, store: Store, *, holder_timeout_s: float, seed: int | None = None
    ) -> None:
        self._node = node
        self._store = store
        self._holder_timeout = holder_timeout_s
        self._rng = random.Random(seed)
        self.stats = FetchStats()
        self._done_tasks: set[asyncio.Task[None]] = set()
        self.load: Counter[str] = Counter()
        """Pull attempts running per holder (the least loaded holder is tried first)."""
        self._not_found: dict[tuple[ChunkKey, str], float] = {}
        """(key, holder) -> when its 'not found' stops being remembered, oldest first."""

    # --- ChunkSource --------------------------------------------------------------------

    async def locate(
        self, ns: NamespaceId, keys: Sequence[ChunkKey], deadline: float
    ) -> dict[ChunkKey, tuple[str, ...]]:
        node = self._node
        self.stats.lookups += 1
        self.stats.lookup_keys += len(keys)
        by_home: dict[str, list[ChunkKey]] = {}
        for key, home in zip(keys, node.homes(keys), strict=True):
            by_home.setdefault(home, []).append(key)
        results = await asyncio.gather(
            *(node.lookup_at(home, group, deadline) for home, group in by_home.items()),
            return_exceptions=True,
        )
        found: dict[ChunkKey, tuple[str, ...]] = {}
        me = node.node_id
        not_found = self._not_found
        if not_found:
            now = time.monotonic()
            while not_found and next(iter(not_found.values())) <= now:
                del not_found[next(iter(not_found))]
        for (home, group), result in zip(by_home.items(), results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, MeshKVError | TimeoutError | OSError):
                    raise result
                logger.debug("lookup at home %s failed: %s", home, result)
                self.stats.failures["lookup"] += 1
                continue
            for key, holders in zip(group, result, strict=True):
                live = tuple(
                    h for h in holders if h != me and node.is_alive(h) and (key, h) not in not_found
                )
                if live:
                    found[key] = live
        self.stats.peer_hits += len(found)
        return found

    def order(self, holders: Sequence[str]) -> list[str]:
        """Least loaded first (attempts running to the holder), random among equals."""
        shuffled = list(holders)
        self._rng.shuffle(shuffled)
        return sorted(shuffled, key=lambda h: self.load[h])

    async def pull(
        self,
        ns: NamespaceId,
        key: ChunkKey,
        holder: str,
        deadline: float,
        *,
        last: bool,
        named: bool = False,
    ) -> str | None:
        """One attempt. While other holders remain, a slow holder gets
        ``holder_timeout_s``; the last one gets what is left of the deadline. A ``named``
        holder (a transfer's producer) is tried even while it is suspected: a paused or
        busy node is still the only one that has the chunks, and a dead one refuses fast."""
        cause = await self._attempt(ns, key, holder, deadline, last=last, named=named)
        if cause == "stale":
            self._remember_not_found(key, holder)
        if cause is not None:
            self.stats.failures[cause] += 1
        return cause

    async def _attempt(
        self,
        ns: NamespaceId,
        key: ChunkKey,
        holder: str,
        deadline: float,
        *,
        last: bool,
        named: bool,
    ) -> str | None:
        node, store = self._node, self._store
        address = node.address_of(holder)
        if address is None or not (named or node.is_alive(holder)):
            return "dead"
        reserved: list[bool] = []

        def recv_into(kind: MsgKind, header: Mapping[str, Any], length: int) -> memoryview | None:
            slot = store.reserve(ns, key, length, MESH_OWNER)
            if slot is None:
                return None  # stored meanwhile: the bytes land in scratch memory
            reserved.append(True)
            return store.payload(slot)

        loop = asyncio.get_running_loop()
        started = time.perf_counter()  # uvloop's loop.time() moves in whole ms
        attempt_deadline = deadline if last else min(deadline, loop.time() + self._holder_timeout)
        # A producer may still be committing what it prefilled: let it wait for that.
        wait = max(0.0, min(1.0, attempt_deadline - loop.time() - 0.05))
        self.load[holder] += 1
        try:
            conn = await node.connection(address, attempt_deadline)
            reply = await conn.request(
                MsgKind.CHUNK_GET,
                {"ns": bytes(ns), "key": bytes(key), "wait": round(wait, 3)},
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
            self._abort(ns, key, reserved)
            return "stale"
        try:
            record = RecordHeader.unpack(reply.header.get("record", b""))
            if record.key != key:
                raise ChecksumMismatch("record is for another key")
            if record.namespace != ns:
                raise NamespaceMismatch("record belongs to another namespace")
            payload = memoryview(reply.payload if reply.payload is not None else b"")
            if payload.nbytes != record.payload_len:
                raise ChecksumMismatch(
                    f"payload length {payload.nbytes} != header's {record.payload_len}"
                )
            # inline when small; a large payload in the hash pool (the xxh3 of 8 x 16 MiB on
            # the loop, 5.4-5.8 ms here, held up every other pull's bytes)
            if await store.hash(payload, inline=True) != record.checksum:
                raise ChecksumMismatch("payload checksum mismatch")
        except (ChecksumMismatch, NamespaceMismatch) as exc:
            self._abort(ns, key, reserved)
            logger.warning("pull of %s from %s rejected: %s", key.hex(), holder, exc)
            return "checksum"
        except BaseException:  # cancelled while verifying: the slot must not stay reserved
            self._abort(ns, key, reserved)
            raise
        if not reserved:
            return None  # another path stored it while the bytes were in flight
        try:
            store.commit(ns, key, MESH_OWNER, record.num_tokens, record.checksum, wanted=True)
        except NotReserved as exc:  # voided: the pull outlived the reservation's deadline
            logger.warning("pull of %s from %s: %s", key.hex(), holder, exc)
            return "expired"
        self.stats.latency.observe(time.perf_counter() - started)
        self.stats.pulls_ok += 1
        self.stats.pull_bytes += record.payload_len
        return None

    def _remember_not_found(self, key: ChunkKey, holder: str) -> None:
        not_found = self._not_found
        not_found.pop((key, holder), None)  # re-inserted last: the dict stays oldest first
        not_found[(key, holder)] = time.monotonic() + NOT_FOUND_MEMORY_S
        while len(not_found) > NOT_FOUND_MEMORY_MAX:
            del not_found[next(iter(not_found))]

    def transfer_done(self, producer: str, transfer_id: str) -> None:
        """Tell the producer, with an acknowledged request on a data connection (a one-way
        control message could be dropped with its link when a busy node is suspected)."""
        if producer == self._node.node_id:
            return
        if len(self._done_tasks) >= MAX_DONE_TASKS:
            self.stats.failures["done_dropped"] += 1
            return
        task = asyncio.create_task(self._send_done(producer, transfer_id))
        self._done_tasks.add(task)
        task.add_done_callback(self._done_tasks.discard)

    async def _send_done(self, producer: str, transfer_id: str) -> None:
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            address = self._node.address_of(producer)
            if address is None:
                return
            deadline = loop.time() + DONE_TIMEOUT_S
            try:
                conn = await self._node.connection(address, deadline)
                if conn.peer.protocol_version < 2:
                    return  # an older peer: its hold simply expires
                await conn.request(MsgKind.TRANSFER_DONE, {"id": transfer_id}, deadline=deadline)
                return
            except (MeshKVError, TimeoutError, OSError) as exc:
                logger.debug("TRANSFER_DONE to %s (try %d): %s", producer, attempt + 1, exc)
        self.stats.failures["done_lost"] += 1

    def transfer_renew(self, producer: str, transfer_ids: Sequence[str], seconds: float) -> None:
        """Ask the producer to hold ``transfer_ids`` ``seconds`` more: one attempt (the
        next renewal comes long before the hold ends), skipped for peers older than
        protocol 3 (their holds end at their deadline, as before)."""
        if producer == self._node.node_id or not transfer_ids:
            return
        if len(self._done_tasks) >= MAX_DONE_TASKS:
            self.stats.failures["renew_dropped"] += 1
            return
        task = asyncio.create_task(self._send_renew(producer, list(transfer_ids), seconds))
        self._done_tasks.add(task)
        task.add_done_callback(self._done_tasks.discard)

    async def _send_renew(self, producer: str, transfer_ids: list[str], seconds: float) -> None:
        address = self._node.address_of(producer)
        if address is None:
            self.stats.failures["renew_lost"] += 1
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DONE_TIMEOUT_S
        try:
            conn = await self._node.connection(address, deadline)
            if conn.peer.protocol_version < KIND_SINCE[MsgKind.TRANSFER_RENEW]:
                return
            for i in range(0, len(transfer_ids), RENEW_BATCH):
                header = {"ids": transfer_ids[i : i + RENEW_BATCH], "s": seconds}
                await conn.request(MsgKind.TRANSFER_RENEW, header, deadline=deadline)
            self.stats.renewals += len(transfer_ids)
        except (MeshKVError, TimeoutError, OSError) as exc:
            logger.debug("TRANSFER_RENEW to %s: %s", producer, exc)
            self.stats.failures["renew_lost"] += 1

    async def close(self) -> None:
        for task in self._done_tasks:
            task.cancel()
        if self._done_tasks:
            await asyncio.wait(self._done_tasks, timeout=1.0)

    def forget(self, node: str) -> None:
        """``node`` left or died: drop its load count."""
        self.load.pop(node, None)

    def _abort(self, ns: NamespaceId, key: ChunkKey, reserved: list[bool]) -> None:
        if reserved:
            reserved.clear()
            try:
                self._store.abort(ns, key, MESH_OWNER)
            except MeshKVError as exc:
                logger.debug("abort of %s after a failed pull: %s", key.hex(), exc)
