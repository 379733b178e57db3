"""``SsdPath``: how chunks move between the arena and the SSD tier, for the ``Store``.

Down: an eviction from the arena becomes an SSD write (write-back, the default; the CPU
tier calls :meth:`SsdPath.demote` with the entry held, or :meth:`SsdPath.demote_copy` when
the slot must be reused at once, which stages a copy of the bytes that is served until
the write lands); with ``write_through`` every commit is written once its checksum is
known (:meth:`SsdPath.write_through`; when the write queue is full the chunk waits in a
backlog and is written when a slot frees, rather than being left only in memory, where an
eviction burst would drop it); on shutdown :meth:`SsdPath.persist` writes what is
only in memory. Up: :meth:`SsdPath.promote` reserves a slot, reads the file straight into
it, verifies it and commits it. The store owns the tiers and the counters; this class
only moves bytes between them, so every step re-checks the entry's generation (the world
may have changed while it awaited the disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from meshkv.chunk import ChunkKey, NamespaceId
from meshkv.errors import NoSpace
from meshkv.tiers.cpu import INTERNAL_OWNER, CpuTier, Entry, State
from meshkv.tiers.ssd import SsdTier

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StoreCounters:
    """The store's own counters (the tiers keep theirs)."""

    lookups: int = 0
    lookup_keys: int = 0
    read_keys: int = 0
    hits_cpu: int = 0
    hits_ssd: int = 0
    misses: int = 0
    promotions: int = 0
    promotion_failures: int = 0
    checksum_failures: int = 0
    checksums_pending: int = 0


@dataclass(slots=True)
class _Staged:
    """An evicted chunk's bytes, copied out of the arena while its SSD write runs."""

    ns: NamespaceId
    num_tokens: int
    checksum: int | None
    buf: bytearray | mmap.mmap
    """Page-aligned (an anonymous mapping) unless empty: the SSD tier writes it with
    O_DIRECT."""


class SsdPath:
    """Write-back, write-through, persist and promotion between ``cpu`` and ``ssd``."""

    def __init__(
        self,
        cpu: CpuTier,
        ssd: SsdTier,
        *,
        namespace_check: bool,
        counters: StoreCounters,
        hash_bytes: Callable[[Any], Awaitable[int]],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        schedule_checksum: Callable[[Entry], None],
        committed: Callable[[ChunkKey, bool], None],
        dropped: Callable[[list[ChunkKey]], None],
    ) -> None:
        self.cpu = cpu
        self.ssd = ssd
        self.namespace_check = namespace_check
        self.closing = False
        self._counters = counters
        self._hash = hash_bytes
        self._spawn = spawn
        self._schedule_checksum = schedule_checksum
        self._committed = committed
        self._dropped = dropped
        self._staged: dict[ChunkKey, _Staged] = {}  # evicted, SSD write in flight
        # Write-through commits that found the write queue full, oldest first: (entry, its
        # generation then). Bounded by the arena's slot ids; a stale one (evicted, already
        # on SSD) is skipped when its turn comes.
        self._backlog: deque[tuple[Entry, int]] = deque(maxlen=max(1, cpu.alloc.num_ids))

    # ------------------------------------------------------------------ lookups

    def holds(self, ns: NamespaceId, key: ChunkKey) -> bool:
        """Whether ``key`` is on SSD or staged for it (``promote`` could bring it in)."""
        return (
            self.ssd.find(ns, key, check_ns=self.namespace_check) is not None
            or self.find_staged(ns, key) is not None
        )

    def find_staged(self, ns: NamespaceId, key: ChunkKey) -> _Staged | None:
        st = self._staged.get(key)
        if st is None or (self.namespace_check and st.ns != ns):
            return None
        return st

    def clear_staged(self) -> list[ChunkKey]:
        """Forget the staged copies (their writes are cancelled by the SSD tier's clear)."""
        keys = list(self._staged)
        self._staged.clear()
        return keys

    # ------------------------------------------------------------------ down: writes

    def maintain(self, headroom: int) -> None:
        """Start write-back when the arena's free space (counting demotions under way)
        falls below ``headroom`` bytes."""
        cpu, ssd = self.cpu, self.ssd
        if self.closing:
            return
        if cpu.alloc.free_bytes + cpu.demoting_bytes < headroom:
            cpu.write_back(headroom, ssd.config.write_queue_depth - ssd.writes_in_flight)

    def demote(self, e: Entry) -> bool:
        """The CPU tier's write-back, with ``e`` already held for us."""
        ssd = self.ssd
        if self.closing or not ssd.admit(e.key, e.size):
            return False
        self._spawn(self._write(e, e.gen, demotion=True))
        return True

    def demote_copy(self, e: Entry) -> bool:
        """The CPU tier must reuse ``e``'s slot at once: copy the bytes out (bounded: at
        most ``write_queue_depth`` copies exist) and write them in the background. Until
        the write lands, the copy is served (lookup says SSD, ``promote`` reads it)."""
        ssd = self.ssd
        if self.closing:
            return False
        if e.key in ssd or ssd.is_writing(e.key):
            return True  # already on SSD, or on its way there (a staged copy)
        if self._queue_full():
            return False  # not counted as a refused write: the CPU tier may pick another
        if not ssd.admit(e.key, e.size):
            return False
        staged = _Staged(e.ns, e.num_tokens, e.checksum, _page_copy(self.cpu.view(e)))
        self._staged[e.key] = staged
        self._spawn(self._write_copy(e.key, staged))
        return True

    @property
    def backlog(self) -> int:
        """Write-through chunks waiting for a write-queue slot (stale ones included)."""
        return len(self._backlog)

    def _queue_full(self) -> bool:
        ssd = self.ssd
        return ssd.writes_in_flight >= ssd.config.write_queue_depth

    async def write_through(self, e: Entry, gen: int) -> None:
        """Write a freshly committed chunk (its checksum known) unless it moved on; with
        the write queue full, leave it in the backlog for the next free slot."""
        if not _dirty(e, gen) or self.closing:
            return
        if self._queue_full() and not self.ssd.degraded:
            self._backlog.append((e, gen))
            return
        if self.ssd.admit(e.key, e.size):
            await self._write(e, self.cpu.hold(e), demotion=False)

    def _next_from_backlog(self) -> None:
        """A write ended: start backlog writes while the queue has room."""
        while self._backlog and not self.closing and not self._queue_full():
            e, gen = self._backlog.popleft()
            if _dirty(e, gen) and self.ssd.admit(e.key, e.size):
                self._spawn(self._write(e, self.cpu.hold(e), demotion=False))

    async def persist(self, e: Entry, deadline: float) -> bool:
        """Start an SSD write of ``e`` if it is only in memory (waits for a queue slot)."""
        ssd = self.ssd
        loop = asyncio.get_running_loop()
        gen = e.gen
        while True:
            if e.gen != gen or e.state is not State.COMMITTED or e.on_ssd or e.doomed:
                return False
            if ssd.admit(e.key, e.size):
                self._spawn(self._write(e, self.cpu.hold(e), demotion=False))
                return True
            if (
                ssd.degraded
                or e.key in ssd
                or not ssd.writes_in_flight  # refused for good (too big for the cap)
                or loop.time() >= deadline
            ):
                return False
            await asyncio.sleep(0.005)  # wait for a write-queue slot

    async def _write_copy(self, key: ChunkKey, staged: _Staged) -> None:
        ssd = self.ssd
        ok = False
        try:
            if staged.checksum is None:
                staged.checksum = await self._hash(staged.buf)
            ok = await ssd.write(
                staged.ns, key, staged.num_tokens, staged.checksum, memoryview(staged.buf)
            )
        finally:
            if self._staged.get(key) is staged:
                del self._staged[key]
            e = self.cpu.get(key)
            if ok and e is not None:
                e.on_ssd = True  # promoted from the copy meanwhile: now clean
            elif not ok and not self.cpu.contains(key) and key not in ssd:
                self._dropped([key])
            self._next_from_backlog()

    async def _write(self, e: Entry, gen: int, *, demotion: bool) -> None:
        """Write an admitted chunk to SSD; the caller holds ``e`` for us (gen ``gen``)."""
        cpu, ssd = self.cpu, self.ssd
        ok = False
        view = cpu.view(e)
        try:
            checksum = e.checksum
            if checksum is None:
                checksum = await self._hash(view)
                cpu.set_checksum(e, gen, checksum)
            ok = await ssd.write(e.ns, e.key, e.num_tokens, checksum, view)
            if ok and (e.gen != gen or e.state is not State.COMMITTED):
                ssd.remove(e.key, "clear")  # cleared while it was being written
                ok = False
        finally:
            with contextlib.suppress(BufferError):  # an abandoned write still uses it
                view.release()
            if demotion:
                cpu.finish_demotion(e, gen, ok)
            else:
                if ok and e.gen == gen:
                    e.on_ssd = True
                cpu.unhold(e, gen)
            self._next_from_backlog()

    # ------------------------------------------------------------------ up: promotion

    async def promote(self, ns: NamespaceId, key: ChunkKey, deadline: float | None) -> bool:
        """See :meth:`meshkv.store.Store.promote`."""
        cpu, ssd, check = self.cpu, self.ssd, self.namespace_check
        se = ssd.find(ns, key, check_ns=check)
        if se is None:
            staged = self.find_staged(ns, key)
            return staged is not None and self._promote_staged(key, staged)
        delay = 0.002
        while True:
            try:
                e = cpu.reserve(se.ns, key, se.payload_len, INTERNAL_OWNER)
                break
            except NoSpace as exc:
                loop = asyncio.get_running_loop()
                if deadline is None or loop.time() + delay > deadline:
                    log.info("cannot promote %s from SSD: %s", key.hex(), exc)
                    self._counters.promotion_failures += 1
                    return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            # The world moved while we slept: someone may have brought it in, or dropped it.
            if cpu.find(ns, key, check_ns=check) is not None:
                return True
            if cpu.contains(key):
                return False
            found = ssd.find(ns, key, check_ns=check)
            if found is None:
                return False
            se = found
        assert e is not None
        gen = e.gen
        committed = False
        try:
            got = await ssd.read_into(ns if check else None, key, cpu.view(e))
            if e.gen != gen or e.state is not State.RESERVED:
                return False  # voided while we read (the finally lifts its fence)
            if got is None:
                self._counters.promotion_failures += 1
                return False
            cpu.commit(se.ns, key, INTERNAL_OWNER, got.num_tokens, got.checksum, wanted=True)
            committed = True
            e.on_ssd = True
            self._counted_promotion(key)
            return True
        finally:
            if not committed and e.gen == gen:
                cpu.abort(se.ns, key, INTERNAL_OWNER)  # also lifts the fence of a voided one

    def _promote_staged(self, key: ChunkKey, staged: _Staged) -> bool:
        cpu = self.cpu
        try:
            e = cpu.reserve(staged.ns, key, len(staged.buf), INTERNAL_OWNER)
        except NoSpace as exc:
            log.info("cannot promote %s from its staged copy: %s", key.hex(), exc)
            self._counters.promotion_failures += 1
            return False
        assert e is not None
        view = cpu.view(e)
        view[:] = staged.buf
        view.release()
        cpu.commit(staged.ns, key, INTERNAL_OWNER, staged.num_tokens, staged.checksum, wanted=True)
        if staged.checksum is None:
            self._schedule_checksum(e)
        self._counted_promotion(key)
        return True

    def _counted_promotion(self, key: ChunkKey) -> None:
        self._counters.promotions += 1
        self._counters.hits_ssd += 1
        self._committed(key, False)


def _dirty(e: Entry, gen: int) -> bool:
    """Whether ``e`` is still the committed chunk of generation ``gen`` and in memory only."""
    return e.gen == gen and e.state is State.COMMITTED and not e.on_ssd and not e.doomed


def _page_copy(view: memoryview) -> bytearray | mmap.mmap:
    """A copy of ``view`` in fresh page-aligned memory (O_DIRECT can write from it)."""
    with view:
        if not len(view):
            return bytearray()
        buf = mmap.mmap(-1, len(view))
        buf[:] = view
        return buf
