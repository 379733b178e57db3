"""The ``Store``: the CPU tier and the SSD tier behind the one API every server calls.

The store moves chunks between tiers (the moves themselves are ``meshkv.store_ssd.SsdPath``):
an eviction from the arena becomes an SSD write (write-back, the default) or, with
``write_through``, every commit is also written to SSD once its checksum is known;
``promote`` brings an SSD chunk back into the arena (reserve a slot, read straight into it,
verify, commit). ``read`` pins what is in the arena: making a
chunk resident first (from SSD, from a peer, from a push in flight) is the job of
``meshkv.puller.Puller``, the one component that decides when to promote or pull, so
that each chunk is moved once however many ask. The store also owns the background work around
commits: the xxh3-64 checksum of each committed chunk is computed in a small thread pool
(xxhash releases the GIL: hashing 1 GiB in a thread delayed the loop by at most 0.14 ms
here), and the chunk is held in its slot until that finishes.

All methods run on the agent's event loop; see docs/internals.md ("Store API") for the
contract and docs/tiers.md for the design.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from meshkv.chunk import KEY_BYTES, ChunkKey, NamespaceId, payload_checksum
from meshkv.errors import StoreError
from meshkv.store_config import StoreConfig
from meshkv.store_ssd import SsdPath, StoreCounters
from meshkv.store_stats import StoreStats, TierStats
from meshkv.tiers.arena import reclaim_stale
from meshkv.tiers.cpu import CpuTier, Entry
from meshkv.tiers.ssd import FaultHook, SsdTier

__all__ = [
    "Pin",
    "Slot",
    "Store",
    "StoreConfig",
    "StoreListener",
    "StoreStats",
    "Tier",
    "TierStats",
    "is_engine_owner",
]

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.5
"""How often expired leases and reservations are reclaimed when nothing else does it."""
INLINE_HASH_BYTES = 4 << 20
"""Chunks moving between nodes up to this size are hashed on the event loop (``Store.hash``
with ``inline``; xxh3: ~0.1 ms per 2 MiB here).
A hash-pool thread returns its result only once it gets the GIL back from a busy loop
thread: measured 1.3 ms median (p90 2.9 ms) from payload received to chunk committed for
2 MiB pulls, against ~0.1 ms inline. Larger payloads still go to the pool, so one 16 MiB
hash (~0.75 ms) does not hold up every other connection's bytes."""


class Tier(enum.StrEnum):
    CPU = "cpu"
    SSD = "ssd"
    PEER = "peer"
    REMOTE = "remote"
    """The shared Redis/Valkey tier (``meshkv.tiers.remote``)."""


_CPU, _SSD = Tier.CPU, Tier.SSD

ENGINE_OWNER_LIMIT = 1 << 62
"""Owner ids in ``1 .. ENGINE_OWNER_LIMIT - 1`` are engine connections of the local channel;
the mesh and the store use ids at or above it (or negative ones) for their own work."""


def is_engine_owner(owner: int) -> bool:
    """Whether ``owner`` is an engine's local connection (not a pull, push or promotion)."""
    return 0 < owner < ENGINE_OWNER_LIMIT


class StoreListener(Protocol):
    """What the store tells the parts around it (the mesh's directory and pusher, the
    puller). Called synchronously on the event loop; must not raise or block."""

    def committed(self, key: ChunkKey, from_engine: bool) -> None:
        """``key`` became visible; ``from_engine``: an engine on this node stored it
        (rather than a pull, a peer's push or a promotion from SSD)."""

    def dropped(self, keys: list[ChunkKey]) -> None:
        """``keys`` left every tier of this node."""

    def aborted(self, key: ChunkKey) -> None:
        """A reservation of ``key`` ended without a commit (abort, writer gone, expiry)."""


@dataclass(frozen=True, slots=True)
class Slot:
    """A byte range of the arena."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Pin:
    """A read lease on a committed chunk."""

    lease_id: int
    key: ChunkKey
    slot: Slot
    num_tokens: int
    checksum: int | None
    """None while the background checksum has not finished."""
    expires_at: float
    """``loop.time()`` deadline; an expired lease is reclaimed and counted."""


class Store:
    """The node's chunk store: CPU tier (the shared arena) plus an optional SSD tier."""

    def __init__(
        self,
        config: StoreConfig,
        namespace_check: bool = True,
        *,
        ssd_fault_hook: FaultHook | None = None,
    ) -> None:
        self.config = config
        self.namespace_check = namespace_check
        self.arena_name = ""
        self.arena_size = 0
        self._ssd_fault_hook = ssd_fault_hook
        self._cpu: CpuTier | None = None
        self._ssd: SsdTier | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hash_pool: ThreadPoolExecutor | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listeners: list[StoreListener] = []
        self._ssd_path: SsdPath | None = None
        self._counters = StoreCounters()
        self._closing = False
        self._sweeper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def cpu(self) -> CpuTier:
        if self._cpu is None:
            raise StoreError("the store is not started (call await store.start())")
        return self._cpu

    @property
    def ssd(self) -> SsdTier | None:
        return self._ssd

    async def start(self) -> None:
        """Reclaim arenas of dead agents, create the arena, scan the SSD directory."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        reclaim_stale(self.config.cpu.shm_dir)
        has_ssd = self.config.ssd is not None  # without one, an eviction drops at once
        cpu = CpuTier(
            self.config.cpu,
            clock=loop.time,
            demote=self._demote if has_ssd else None,
            demote_copy=self._demote_copy if has_ssd else None,
            on_detach=self._on_cpu_detach,
            on_abort=self._on_abort,
        )
        self._cpu = cpu
        self.arena_name = cpu.arena.name
        self.arena_size = cpu.arena.size
        self._hash_pool = ThreadPoolExecutor(self.config.hash_workers, "meshkv-hash")
        ssd_config = self.config.ssd
        if ssd_config is not None:
            self._ssd = SsdTier(
                ssd_config,
                fault_hook=self._ssd_fault_hook,
                on_drop=self._on_ssd_drop,
                clock=loop.time,
            )
            try:
                await self._ssd.start()
            except BaseException:
                self._ssd.close()
                self._ssd = None
                self._hash_pool.shutdown(wait=True)
                cpu.close()
                self._cpu = None
                raise
            self._ssd_path = SsdPath(
                cpu,
                self._ssd,
                namespace_check=self.namespace_check,
                counters=self._counters,
                hash_bytes=self.hash,
                spawn=self._spawn,
                schedule_checksum=self._schedule_checksum,
                committed=self._emit_committed,
                dropped=self._emit_dropped,
            )
        self._sweeper = loop.create_task(self._sweep_loop())

    async def close(self, deadline: float) -> None:
        """Stop background work, persist in-memory chunks (if configured) and unlink the arena.

        ``deadline`` is a ``loop.time()`` value; SSD writes still running then are abandoned
        (their temp files are removed by the next start-up scan).
        """
        if self._closing or self._cpu is None:
            return
        loop = asyncio.get_running_loop()
        self._closing = True
        cpu, ssd, path = self._cpu, self._ssd, self._ssd_path
        if path is not None:
            path.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if path is not None and self.config.persist_on_shutdown:
            flushed = 0
            for e in cpu.entries():
                if loop.time() >= deadline:
                    log.warning("shutdown deadline reached; %d chunks not persisted", len(cpu))
                    break
                if await path.persist(e, deadline):
                    flushed += 1
            log.info("persisting %d in-memory chunks to SSD", flushed)
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True)
        if ssd is not None:
            ssd.close()
        cpu.close()
        log.info("store closed (arena %s unlinked)", self.arena_name)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("store background task failed", exc_info=task.exception())

    async def _sweep_loop(self) -> None:
        assert self._loop is not None
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                self.cpu.sweep(self._loop.time())
                self._maintain()
            except Exception:  # a bug here must not stop lease expiry for good
                log.exception("store sweep failed")

    def _maintain(self) -> None:
        if self._ssd_path is not None:
            self._ssd_path.maintain(int(self.config.writeback_headroom * self.cpu.capacity_bytes))

    def _demote(self, e: Entry) -> bool:
        return self._ssd_path is not None and self._ssd_path.demote(e)

    def _demote_copy(self, e: Entry) -> bool:
        return self._ssd_path is not None and self._ssd_path.demote_copy(e)

    def sweep(self) -> None:
        """Reclaim expired leases and reservations now."""
        assert self._loop is not None
        self.cpu.sweep(self._loop.time())

    # ------------------------------------------------------------------ listeners

    def add_listener(self, listener: StoreListener) -> None:
        """Tell ``listener`` about commits, drops and aborted reservations from now on."""
        self._listeners.append(listener)

    def _emit_dropped(self, keys: list[ChunkKey]) -> None:
        for listener in self._listeners:
            try:
                listener.dropped(keys)
            except Exception:
                log.exception("store listener failed")

    def _emit_committed(self, key: ChunkKey, from_engine: bool) -> None:
        for listener in self._listeners:
            try:
                listener.committed(key, from_engine)
            except Exception:
                log.exception("store listener failed")

    def _on_abort(self, key: ChunkKey) -> None:
        for listener in self._listeners:
            try:
                listener.aborted(key)
            except Exception:
                log.exception("store listener failed")

    def _on_cpu_detach(self, e: Entry) -> None:
        ssd = self._ssd
        if ssd is None or not (e.key in ssd or ssd.is_writing(e.key)):
            self._emit_dropped([e.key])

    def _on_ssd_drop(self, key: ChunkKey) -> None:
        e = self.cpu.get(key)
        if e is not None:
            e.on_ssd = False
        elif self._cpu is not None and not self._cpu.contains(key):
            self._emit_dropped([key])

    # ------------------------------------------------------------------ API

    def lookup(self, ns: NamespaceId, keys: Sequence[ChunkKey]) -> list[Tier | None]:
        """Where each key is stored locally (None: not here)."""
        c = self._counters
        c.lookups += 1
        c.lookup_keys += len(keys)
        return self.peek(ns, keys)

    def peek(self, ns: NamespaceId, keys: Sequence[ChunkKey]) -> list[Tier | None]:
        """:meth:`lookup` without counting it (prefix queries of routers: no recency is
        touched either way)."""
        cpu, path, check = self.cpu, self._ssd_path, self.namespace_check
        for key in keys:
            if type(key) is not bytes or len(key) != KEY_BYTES:
                _check_key(key)  # raises unless it is a bytes subclass of the right length
        found = cpu.find_many(ns, keys, check_ns=check)
        in_cpu = _CPU  # not Tier.CPU in the loop: enum attribute access costs ~0.1 µs
        if path is None:
            return [None if e is None else in_cpu for e in found]
        out: list[Tier | None] = []
        for key, e in zip(keys, found, strict=True):
            if e is not None:
                out.append(in_cpu)
            elif path.holds(ns, key):
                out.append(_SSD)
            else:
                out.append(None)
        return out

    def reserve(self, ns: NamespaceId, key: ChunkKey, size: int, owner: int) -> Slot | None:
        """A slot to write ``key`` into; None if it is already stored or being stored."""
        _check_key(key)
        if self._closing:
            raise StoreError("the store is shutting down")
        ssd = self._ssd
        if ssd is not None and (key in ssd or ssd.is_writing(key)):
            return None
        e = self.cpu.reserve(ns, key, size, owner)
        return None if e is None else Slot(e.offset, e.size)

    def commit(
        self,
        ns: NamespaceId,
        key: ChunkKey,
        owner: int,
        num_tokens: int,
        checksum: int | None = None,
        *,
        wanted: bool = False,
    ) -> None:
        """Make a reserved chunk visible. ``wanted``: brought in for a reader that has not
        pinned it yet (a peer pull, a remote-tier fetch, a prefill/decode push): it enters
        the CPU tier's eviction policy as used once (``CpuTier.commit``).

        Without a ``checksum`` the chunk's xxh3-64 is computed in the background right away
        only when something needs it soon: ``verify_reads`` (reads compare against it) or
        write-through (an SSD write follows). Otherwise it is deferred until the chunk
        leaves the arena (SSD write, peer send: :meth:`checksum_for`), so the hot store
        path does no hashing at all (docs/tiers.md, "Checksums").
        """
        cpu = self.cpu
        e = cpu.commit(ns, key, owner, num_tokens, checksum, wanted=wanted)
        write_through = self.config.write_through and self._ssd is not None
        if checksum is None:
            if write_through or self.config.verify_reads:
                self._schedule_checksum(e)
        elif write_through:
            self._spawn(self._after_commit(e, e.gen))
        if self._listeners:
            self._emit_committed(key, is_engine_owner(owner))
        if self._ssd is not None:
            self._maintain()

    def _schedule_checksum(self, e: Entry) -> None:
        self._counters.checksums_pending += 1
        self._spawn(self._after_commit(e, e.gen))

    async def _after_commit(self, e: Entry, gen: int) -> None:
        # The background hash does not hold the slot: a chunk evicted meanwhile is simply
        # not updated (every step checks the generation), so fresh chunks stay evictable.
        cpu = self.cpu
        if e.checksum is None:
            assert self._loop is not None and self._hash_pool is not None
            view = cpu.view(e)
            try:
                value = await self._loop.run_in_executor(self._hash_pool, payload_checksum, view)
            finally:
                with contextlib.suppress(BufferError):  # cancelled while the thread hashes
                    view.release()
                self._counters.checksums_pending -= 1
            cpu.set_checksum(e, gen, value)
        if self.config.write_through and self._ssd_path is not None:
            await self._ssd_path.write_through(e, gen)

    def abort(self, ns: NamespaceId, key: ChunkKey, owner: int) -> None:
        """Give up a reservation (raises ``NotReserved`` if there is none)."""
        self.cpu.abort(ns, key, owner)

    async def read(
        self,
        ns: NamespaceId,
        keys: Sequence[ChunkKey],
        owner: int,
        lease_s: float,
        verify: bool | None = None,
    ) -> list[Pin | None]:
        """Pin each key that is in the arena; None: not there (on SSD, on a peer or
        nowhere: making it resident is the puller's job, see ``promote``)."""
        if verify is None:
            verify = self.config.verify_reads
        if not lease_s > 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        cpu, check = self.cpu, self.namespace_check
        c = self._counters
        c.read_keys += len(keys)
        out: list[Pin | None] = []
        for key in keys:
            _check_key(key)
            e = cpu.find(ns, key, check_ns=check)
            if e is not None:
                out.append(self._pin(e, owner, lease_s))
                c.hits_cpu += 1
            else:
                out.append(None)
                c.misses += 1
        if verify:
            await self._verify_pins(out, owner)
        return out

    def pin_now(self, ns: NamespaceId, key: ChunkKey, owner: int, lease_s: float) -> Pin | None:
        """Pin ``key`` if it is in the arena (no verification, no hit counted), or None.
        For the agent's own work on a chunk (a transfer's hold, a copy to the remote tier)
        rather than an engine's read."""
        e = self.cpu.find(ns, key, check_ns=self.namespace_check)
        if e is None:
            return None
        return self._pin(e, owner, lease_s, count=False)

    def on_ssd(self, ns: NamespaceId, key: ChunkKey) -> bool:
        """Whether ``promote`` could bring ``key`` into the arena (an SSD file or the copy
        of an evicted chunk whose SSD write is still running)."""
        return self._ssd_path is not None and self._ssd_path.holds(ns, key)

    def being_written(self, key: ChunkKey) -> bool:
        """Whether ``key`` is reserved in the arena (a writer's commit is pending)."""
        return self.cpu.is_reserved(key)

    def _pin(self, e: Entry, owner: int, lease_s: float, *, count: bool = True) -> Pin:
        lease = self.cpu.pin(e, owner, lease_s, count=count)
        return Pin(
            lease.lease_id,
            e.key,
            Slot(e.offset, e.size),
            e.num_tokens,
            e.checksum,
            lease.expires_at,
        )

    async def _verify_pins(self, pins: list[Pin | None], owner: int) -> None:
        cpu = self.cpu
        loop = asyncio.get_running_loop()
        for i, pin in enumerate(pins):
            if pin is None or pin.checksum is None:
                continue  # a pending checksum is being computed from these very bytes
            value = await loop.run_in_executor(
                self._hash_pool, payload_checksum, self.payload(pin.slot)
            )
            if value == pin.checksum:
                continue
            log.error("arena bytes of chunk %s changed after commit; dropped", pin.key.hex())
            self._counters.checksum_failures += 1
            cpu.release([pin.lease_id], owner)
            e = cpu.get(pin.key)
            if e is not None and e.offset == pin.slot.offset:
                cpu.drop(e, "checksum")
            pins[i] = None
            self._counters.hits_cpu -= 1
            self._counters.misses += 1

    async def promote(self, ns: NamespaceId, key: ChunkKey, deadline: float | None = None) -> bool:
        """Bring ``key`` from SSD (or its staged copy) into the arena; True if it is in the
        arena afterwards. Verified before it becomes visible; a file that fails its
        checksum is removed and counted. Not single-flight: the caller (the puller) makes
        sure one promotion of a key runs at a time; a key someone else is writing right
        now is not promoted (False).

        With a ``deadline`` (event-loop time), an arena with no evictable slot right now is
        waited for (backing off from 2 to 50 ms) until then: slots come free within
        milliseconds as loads release their leases and demotions reach the disk, and a
        promotion that gives up makes the engine recompute what is on disk (measured in
        ``bench serve``'s SSD arm: 16 % of reusable tokens recomputed without the wait)."""
        cpu, path = self.cpu, self._ssd_path
        if cpu.find(ns, key, check_ns=self.namespace_check) is not None:
            return True
        if path is None or cpu.contains(key):
            return False
        return await path.promote(ns, key, deadline)

    def release(self, lease_ids: Sequence[int], owner: int) -> None:
        """Close read leases; ``NotPinned`` for ids that are not open (double release)."""
        self.cpu.release(list(lease_ids), owner)

    def release_owner(self, owner: int) -> None:
        """Close every lease and abort every reservation of ``owner`` (it disconnected)."""
        self.cpu.release_owner(owner)

    def payload(self, slot: Slot) -> memoryview:
        """Writable view of a slot's bytes in the arena."""
        return self.cpu.arena.view(slot.offset, slot.length)

    async def hash(self, payload: memoryview, *, inline: bool = False) -> int:
        """xxh3-64 of ``payload``, computed in the hash pool (xxhash releases the GIL), so
        the event loop keeps serving meanwhile. ``inline``: a payload of at most
        ``INLINE_HASH_BYTES`` is hashed right here instead (a chunk on its way between
        nodes, where the hop back from the pool is most of the cost); background work
        (SSD writes) keeps the default, so its bursts never hold up the loop."""
        if inline and payload.nbytes <= INLINE_HASH_BYTES:
            return payload_checksum(payload)
        assert self._loop is not None
        return await self._loop.run_in_executor(self._hash_pool, payload_checksum, payload)

    async def checksum_for(self, pin: Pin) -> int:
        """xxh3-64 of a pinned chunk (a peer send): the known value, else hashed now from
        the pinned slot (``hash``, inline when small) and remembered."""
        if pin.checksum is not None:
            return pin.checksum
        assert self._loop is not None
        e = self.cpu.get(pin.key)
        if e is not None and e.offset == pin.slot.offset and e.checksum is not None:
            return e.checksum
        gen = e.gen if e is not None else -1
        view = self.payload(pin.slot)
        try:
            value = await self.hash(view, inline=True)
        finally:
            with contextlib.suppress(BufferError):
                view.release()
        if e is not None and e.offset == pin.slot.offset:
            self.cpu.set_checksum(e, gen, value)
        return value

    def checksum_of(self, key: ChunkKey) -> int:
        """xxh3-64 of a stored chunk's payload (computed now if still pending)."""
        _check_key(key)
        e = self.cpu.get(key)
        if e is not None:
            return self.cpu.checksum(e)
        se = self._ssd.get(key) if self._ssd is not None else None
        if se is not None:
            return se.checksum
        raise StoreError(f"chunk {key.hex()} is not stored")

    def describe(self, key: ChunkKey) -> dict[str, Any] | None:
        """Where ``key`` is, in any namespace (for ``/v1/chunks/{key}``); None if nowhere."""
        _check_key(key)
        tiers: list[str] = []
        info: dict[str, Any] = {}
        e = self.cpu.get(key)
        if e is not None:
            tiers.append(Tier.CPU.value)
            info.update(
                namespace=e.ns.hex(),
                size=e.size,
                num_tokens=e.num_tokens,
                checksum=e.checksum,
                pins=e.pins,
            )
        se = self._ssd.get(key) if self._ssd is not None else None
        if se is not None:
            tiers.append(Tier.SSD.value)
            info.setdefault("namespace", se.ns.hex())
            info.setdefault("size", se.payload_len)
            info.setdefault("num_tokens", se.num_tokens)
            info.setdefault("checksum", se.checksum)
        if not tiers:
            return None
        info["tiers"] = tiers
        return info

    def clear(self) -> int:
        """Drop every chunk in every tier (pinned ones leave when released); returns how many."""
        keys = {e.key for e in self.cpu.entries()}
        if self._ssd_path is not None:
            keys.update(self._ssd_path.clear_staged())
        self.cpu.clear()
        if self._ssd is not None:
            keys.update(self._ssd_keys())
            self._ssd.clear()
        return len(keys)

    def _ssd_keys(self) -> list[ChunkKey]:
        assert self._ssd is not None
        return self._ssd.chunk_keys()

    # ------------------------------------------------------------------ stats

    def snapshot(self) -> StoreStats:
        cpu, ssd, c = self.cpu, self._ssd, self._counters
        cc = cpu.counters
        tiers = {
            Tier.CPU.value: TierStats(
                chunks=len(cpu),
                usage_bytes=cpu.used_bytes,
                capacity_bytes=cpu.capacity_bytes,
                hit_chunks=c.hits_cpu,
                stored_bytes=cc.stored_bytes,
                loaded_bytes=cc.loaded_bytes,
                evictions=dict(cc.evictions),
            )
        }
        stats = StoreStats(
            arena_name=self.arena_name,
            tiers=tiers,
            lookups=c.lookups,
            lookup_keys=c.lookup_keys,
            read_keys=c.read_keys,
            miss_chunks=c.misses,
            namespace_mismatches=cc.namespace_mismatches,
            leases_open=cpu.open_leases,
            pinned_chunks=cpu.pinned_entries,
            reservations_open=cpu.reserved,
            leases_expired=cc.leases_expired,
            reservations_expired=cc.reservations_expired,
            leases_overdue=cpu.overdue_leases,
            fenced_slots=cpu.fenced_slots,
            late_commits=cc.late_commits,
            checksum_failures=c.checksum_failures,
            checksums_pending=c.checksums_pending,
            demotions=cc.evictions.get("demoted", 0),
            demotions_dropped=cc.demotions_dropped,
            promotions=c.promotions,
            promotion_failures=c.promotion_failures,
        )
        if ssd is not None:
            sc = ssd.counters
            tiers[Tier.SSD.value] = TierStats(
                chunks=len(ssd),
                usage_bytes=ssd.used_bytes,
                capacity_bytes=ssd.capacity_bytes,
                hit_chunks=c.hits_ssd,
                stored_bytes=sc.stored_bytes,
                loaded_bytes=sc.loaded_bytes,
                evictions=dict(sc.evictions),
            )
            stats.namespace_mismatches += sc.namespace_mismatches
            stats.checksum_failures += sc.checksum_failures
            stats.ssd_degraded = ssd.degraded
            stats.ssd_write_errors = sc.write_errors
            stats.ssd_read_errors = sc.read_errors
            stats.ssd_writes_refused = sc.writes_refused
            stats.ssd_direct_writes = sc.direct_writes
            stats.ssd_direct_reads = sc.direct_reads
            stats.ssd_partial_removed = sc.partial_removed
            stats.ssd_corrupt_removed = sc.corrupt_removed
        return stats


def _check_key(key: object) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        got = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
        raise ValueError(f"chunk key must be a {KEY_BYTES}-byte bytes object, got {got}")
