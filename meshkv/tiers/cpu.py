"""The CPU tier: the arena's index, reservations, read leases (pins) and eviction.

Every call is synchronous and O(1) per key (eviction is O(1) amortized); the store calls
it from the agent's event loop. The tier never does I/O: a chunk that must leave for the
SSD is handed to the store's ``demote`` callbacks.

Life of a slot::

    free ──reserve──▶ RESERVED ──commit──▶ COMMITTED ──evict / clear / drop──▶ DETACHED ──▶ free
                         │  (owner writes)      │ pins (leases) and holds       (no longer in the
                         ├──abort───────────────┼─────────────────────────▶ free  index; freed when
                         └──expiry──▶ DETACHED, fenced: freed when the owner      the last pin or
                                      commits/aborts it or disconnects            hold goes)

Invariant 4: a slot with a pin (a reader's lease) or a hold (an SSD write from the slot)
is never evicted or reused; the victim search skips it. The background checksum does not
hold a slot: it checks the slot's generation before storing its result.

Fencing: the engines map the arena, so the tier cannot revoke a client's access to a slot;
it can only refuse to reuse the slot while the client may still touch it. An expired lease
therefore stays open (*overdue*: counted and logged, its slot still pinned) until its owner
releases it or disconnects, and an expired reservation is *voided* (the key leaves the index,
so others may store it; a late commit fails) while its slot stays held until the owner's
commit or abort says its copy ended, or the owner disconnects. A late copy thus lands in a
slot nobody reads, never in another chunk.
"""

from __future__ import annotations

import enum
import heapq
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from meshkv.chunk import KEY_BYTES, ChunkKey, NamespaceId, payload_checksum
from meshkv.errors import ConfigError, NoSpace, NotPinned, NotReserved
from meshkv.tiers.arena import SHM_DIR, Arena
from meshkv.tiers.eviction import make_policy
from meshkv.tiers.slots import SlotAllocator

log = logging.getLogger(__name__)

HEAP_SLACK = 1024
"""Stale deadline-heap entries tolerated before a rebuild (amortized O(1) per operation)."""

INTERNAL_OWNER = -1
"""Owner id of the store's own reservations and leases (promotions, peer sends)."""


@dataclass(slots=True)
class CpuTierConfig:
    """Configuration of the shared-memory CPU tier."""

    capacity_bytes: int = 4 << 30
    """Arena size in bytes; rounded down to whole segments."""
    segment_bytes: int = 64 << 20
    """Arena segment size (a power of two); also the largest chunk the tier accepts."""
    min_slot_bytes: int = 64 << 10
    """Smallest size class (a power of two >= 16 KiB); smaller chunks are padded."""
    eviction: str = "s3fifo"
    """Eviction policy: ``s3fifo`` (scan-resistant) or ``lru``."""
    reserve_timeout_s: float = 60.0
    """A reservation not committed within this time is voided (its slot fenced until the
    writer commits, aborts or disconnects)."""
    max_lease_s: float = 600.0
    """Upper bound on a read lease; longer requests are clamped. A lease past its deadline
    is counted as overdue and keeps its slot until released or its owner disconnects."""
    max_leases: int = 1 << 16
    """Open read leases at most; more reads raise ``NoSpace`` until some are released."""
    prefault: bool = True
    """Write every arena page once at start so first copies run at memcpy speed."""
    shm_dir: str = SHM_DIR
    """Directory of the arena file (a tmpfs)."""

    def __post_init__(self) -> None:
        if self.capacity_bytes < self.segment_bytes:
            raise ConfigError(
                f"cpu.capacity_bytes ({self.capacity_bytes}) must hold at least one "
                f"segment of cpu.segment_bytes ({self.segment_bytes})"
            )
        for name in ("segment_bytes", "min_slot_bytes"):
            value = getattr(self, name)
            if value < 16 << 10 or value & (value - 1):
                raise ConfigError(f"cpu.{name} must be a power of two >= 16384, got {value}")
        if self.min_slot_bytes > self.segment_bytes:
            raise ConfigError("cpu.min_slot_bytes must not exceed cpu.segment_bytes")
        if self.eviction not in ("lru", "s3fifo"):
            raise ConfigError(f"cpu.eviction must be 'lru' or 's3fifo', got {self.eviction!r}")
        if self.reserve_timeout_s <= 0 or self.max_lease_s <= 0:
            raise ConfigError("cpu.reserve_timeout_s and cpu.max_lease_s must be positive")
        if self.max_leases <= 0:
            raise ConfigError("cpu.max_leases must be positive")
        if not os.path.isdir(self.shm_dir):
            raise ConfigError(f"cpu.shm_dir {self.shm_dir} is not a directory (a tmpfs)")


class State(enum.IntEnum):
    FREE = 0
    RESERVED = 1
    COMMITTED = 2
    DETACHED = 3


@dataclass(frozen=True, slots=True)
class SlotUse:
    """The CPU tier's occupied slots by what keeps each (``CpuTier.slot_use``)."""

    pinned: int
    """Pinned by read leases."""
    reserved: int
    """Reserved by a writer, not yet committed."""
    held: int
    """Held by background work: an SSD write, a checksum, a voided reservation's fence."""
    evictable: int
    """Committed and free to evict."""


@dataclass(slots=True, eq=False)
class Entry:
    """Per-slot record, created once per slot id and reused (no allocation per chunk)."""

    slot: int
    offset: int = 0
    size: int = 0
    key: ChunkKey = ChunkKey(b"")
    ns: NamespaceId = NamespaceId(b"")
    num_tokens: int = 0
    checksum: int | None = None
    state: State = State.FREE
    owner: int = 0
    deadline: float = 0.0
    pins: int = 0
    """Open read leases."""
    holds: int = 0
    """Internal holds: background checksum, SSD write."""
    on_ssd: bool = False
    """The SSD tier holds an identical copy (eviction may drop this one for free)."""
    doomed: bool = False
    """Chosen for eviction; leaves when its SSD write finishes."""
    gen: int = 0
    """Bumped on every reuse of the slot, so stale callbacks can tell."""


@dataclass(slots=True)
class Lease:
    lease_id: int
    entry: Entry
    owner: int
    expires_at: float
    overdue: bool = False


@dataclass(slots=True)
class CpuCounters:
    """Monotonic counters of the CPU tier."""

    hits: int = 0
    misses: int = 0
    namespace_mismatches: int = 0
    stored_bytes: int = 0
    loaded_bytes: int = 0
    evictions: dict[str, int] = field(default_factory=dict)
    """By reason: ``capacity`` (dropped), ``demoted`` (moved to SSD), ``checksum``, ``clear``."""
    leases_expired: int = 0
    """Leases that passed their deadline (each counted once; see *overdue*)."""
    reservations_expired: int = 0
    """Reservations voided at their deadline."""
    late_commits: int = 0
    """Commits of a voided reservation (refused: the chunk was not stored)."""
    demotions_started: int = 0
    demotions_dropped: int = 0
    checksum_failures: int = 0


class CpuTier:
    """Index + allocator + eviction over one arena."""

    def __init__(
        self,
        config: CpuTierConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        demote: Callable[[Entry], bool] | None = None,
        demote_copy: Callable[[Entry], bool] | None = None,
        on_detach: Callable[[Entry], None] | None = None,
        on_abort: Callable[[ChunkKey], None] | None = None,
        arena: Arena | None = None,
    ) -> None:
        """SSD hand-off callbacks (both return False when the SSD cannot take a write now):

        * ``demote(entry)`` starts a write straight from the held slot (background
          write-back, :meth:`write_back`); the entry leaves when it finishes.
        * ``demote_copy(entry)`` copies the bytes out and writes them later, so that the
          slot can be reused at once (eviction on demand in :meth:`reserve`). A refusal
          drops the chunk (counted as ``demotions_dropped``).

        ``on_detach(entry)`` is told about every chunk leaving the tier, ``on_abort(key)``
        about every reservation that ends without a commit (abort, owner gone, expiry)."""
        self.config = config
        self.clock = clock
        self.demote = demote
        self.demote_copy = demote_copy
        self.on_detach = on_detach
        self.on_abort = on_abort
        self.alloc = SlotAllocator(
            config.capacity_bytes, config.segment_bytes, config.min_slot_bytes
        )
        size = self.alloc.capacity_bytes
        self.arena = arena or Arena.create(size, prefault=config.prefault, shm_dir=config.shm_dir)
        n = self.alloc.num_ids
        self.policy = make_policy(config.eviction, n)
        self._entries: list[Entry | None] = [None] * n
        self._index: dict[ChunkKey, Entry] = {}
        self._leases: dict[int, Lease] = {}
        self._next_lease = 1
        self._lease_heap: list[tuple[float, int]] = []
        self._reserve_heap: list[tuple[float, int, int]] = []
        self._owner_leases: dict[int, set[int]] = {}
        self._owner_reserved: dict[int, set[ChunkKey]] = {}
        self._voided: dict[tuple[int, ChunkKey], list[Entry]] = {}
        """(owner, key) → slots of voided reservations, fenced until the owner is done."""
        self.overdue_leases = 0
        self.fenced_bytes = 0
        """Slot bytes of voided reservations still fenced."""
        self.counters = CpuCounters()
        self.used_bytes = 0
        self.reserved = 0
        self.pinned_entries = 0
        self.demoting_bytes = 0
        """Slot bytes held by background write-back that will be freed when it finishes."""

    # ------------------------------------------------------------------ queries

    @property
    def capacity_bytes(self) -> int:
        return self.alloc.capacity_bytes

    def __len__(self) -> int:
        return len(self._index)

    @property
    def open_leases(self) -> int:
        return len(self._leases)

    def get(self, key: ChunkKey) -> Entry | None:
        """The committed entry of ``key`` (any namespace), else None."""
        e = self._index.get(key)
        return e if e is not None and e.state is State.COMMITTED else None

    def find(self, ns: NamespaceId, key: ChunkKey, *, check_ns: bool = True) -> Entry | None:
        """The committed entry of ``key`` in ``ns``; a foreign namespace counts as a miss."""
        e = self._index.get(key)
        if e is None or e.state is not State.COMMITTED:
            return None
        if check_ns and e.ns != ns:
            self.counters.namespace_mismatches += 1
            return None
        return e

    def find_many(
        self, ns: NamespaceId, keys: Sequence[ChunkKey], *, check_ns: bool = True
    ) -> list[Entry | None]:
        """:meth:`find` for each key (same counting), in one loop: the lookup hot path
        (64 keys per engine request; a method call per key cost about half of it)."""
        get = self._index.get
        committed = State.COMMITTED
        out: list[Entry | None] = []
        append = out.append
        for key in keys:
            e = get(key)
            if e is None or e.state is not committed:
                append(None)
            elif check_ns and e.ns != ns:
                self.counters.namespace_mismatches += 1
                append(None)
            else:
                append(e)
        return out

    def contains(self, key: ChunkKey) -> bool:
        """Whether ``key`` is reserved or committed here."""
        return key in self._index

    def is_reserved(self, key: ChunkKey) -> bool:
        """Whether ``key`` is reserved here (being written, not yet committed)."""
        e = self._index.get(key)
        return e is not None and e.state is State.RESERVED

    def view(self, e: Entry) -> memoryview:
        return self.arena.view(e.offset, e.size)

    def entries(self) -> Iterator[Entry]:
        """Committed entries (a snapshot list, safe against changes while iterating)."""
        return iter([e for e in self._index.values() if e.state is State.COMMITTED])

    # ------------------------------------------------------------------ writes

    def reserve(self, ns: NamespaceId, key: ChunkKey, size: int, owner: int) -> Entry | None:
        """Reserve a slot for ``key``; None if the key is already reserved or stored."""
        _check_key(key)
        _check_ns(ns)
        if key in self._index:
            return None
        c = self.alloc.class_of(size)
        now = self.clock()
        lheap, rheap = self._lease_heap, self._reserve_heap
        if (lheap and lheap[0][0] <= now) or (rheap and rheap[0][0] <= now):
            self.sweep(now)  # checked inline: a call per key cost more than the sweep
        slot = self.alloc.alloc(c)
        if slot < 0:
            slot = self.alloc.alloc_larger(c, size)
        if slot < 0:
            slot = self._make_room(c, size)
        e = self._entries[slot]
        if e is None:
            e = self._entries[slot] = Entry(slot)
        e.gen += 1
        e.offset = self.alloc.offset(slot)
        e.size = size
        e.key = key
        e.ns = ns
        e.num_tokens = 0
        e.checksum = None
        e.state = State.RESERVED
        e.owner = owner
        e.deadline = now + self.config.reserve_timeout_s
        e.pins = e.holds = 0
        e.on_ssd = e.doomed = False
        self._index[key] = e
        keys = self._owner_reserved.get(owner)
        if keys is None:  # not setdefault(owner, set()): that builds a set per call
            keys = self._owner_reserved[owner] = set()
        keys.add(key)
        heapq.heappush(rheap, (e.deadline, slot, e.gen))
        self.reserved += 1
        self.used_bytes += self.alloc.slot_bytes(slot)
        return e

    def _make_room(self, c: int, size: int) -> int:
        # Each round either frees a slot or moves a victim aside; the policy says how many
        # rounds visit every candidate (S3-FIFO passes over a chunk once per read before it
        # proposes it, so len(policy) + 1 were too few among pinned chunks). A chunk only in
        # memory whose SSD write cannot start now (the write queue is full) is moved aside
        # too, while a chunk that can leave without loss is looked for; only if none is
        # found is such a chunk dropped.
        rounds = self.policy.walk_length()
        evicted = 0
        unsaved: list[Entry] = []
        while rounds > 0:
            rounds -= 1
            v = self.policy.victim()
            if v < 0:
                break
            e = self._entries[v]
            assert e is not None
            if e.pins or e.holds:
                self.policy.skip(v)
                continue
            if not self._evict(e, drop=False):
                self.policy.skip(v)
                unsaved.append(e)
                continue
            evicted += 1
            slot = self._alloc_after_evict(c, size)
            if slot >= 0:
                return slot
        for e in unsaved:
            if e.pins or e.holds or e.state is not State.COMMITTED:
                continue
            self._evict(e, drop=True)
            evicted += 1
            slot = self._alloc_after_evict(c, size)
            if slot >= 0:
                return slot
        use = self.slot_use()
        raise NoSpace(
            f"CPU tier full: no free slot for a {size}-byte chunk after evicting {evicted} "
            f"chunks; the rest cannot go now ({use.pinned} chunks pinned by readers, "
            f"{use.reserved} reserved by writers, {use.held} held by SSD writes, checksums "
            f"or expired reservations, {use.evictable} evictable); release leases or retry "
            "later"
        )

    def slot_use(self) -> SlotUse:
        """What the occupied slots are doing, each counted once (pins first). A walk over
        every slot: for error messages and tests, not for a hot path."""
        pinned = reserved = held = evictable = 0
        for e in self._entries:
            if e is None or e.state is State.FREE:
                continue
            if e.pins:
                pinned += 1
            elif e.state is State.RESERVED:
                reserved += 1
            elif e.holds:
                held += 1
            else:
                evictable += 1
        return SlotUse(pinned, reserved, held, evictable)

    def _alloc_after_evict(self, c: int, size: int) -> int:
        slot = self.alloc.alloc(c)
        if slot < 0:  # e.g. the victim's slot, if its class is larger
            slot = self.alloc.alloc_larger(c, size)
        return slot

    def _evict(self, e: Entry, *, drop: bool) -> bool:
        """Evict ``e`` now (its slot is needed at once): to SSD if it is only in memory and
        there is an SSD; else dropped if ``drop``. False (and ``e`` untouched) if it would
        have been dropped and ``drop`` is False."""
        if not e.on_ssd and self.demote_copy is not None:
            if self.demote_copy(e):
                self.policy.remove(e.slot, True)
                self.counters.demotions_started += 1
                self._detach(e, "demoted")
                return True
            if not drop:
                return False
            self.counters.demotions_dropped += 1
        self.policy.remove(e.slot, True)
        self._detach(e, "demoted" if e.on_ssd else "capacity")
        return True

    def write_back(self, headroom_bytes: int, max_writes: int) -> None:
        """Evict ahead of demand until ``headroom_bytes`` are free or being freed.

        Clean victims (already on SSD) leave at once; dirty ones are handed to ``demote``,
        which writes them from their slot (held, still readable) and then calls
        :meth:`finish_demotion`. At most ``max_writes`` writes are started.
        """
        if self.demote is None:
            return
        rounds = self.policy.walk_length()
        while (
            self.alloc.free_bytes + self.demoting_bytes < headroom_bytes
            and rounds > 0
            and max_writes > 0
        ):
            rounds -= 1
            v = self.policy.victim()
            if v < 0:
                return
            e = self._entries[v]
            assert e is not None
            if e.pins or e.holds:
                self.policy.skip(v)
                continue
            if e.on_ssd:
                self.policy.remove(v, True)
                self._detach(e, "demoted")
                continue
            e.holds += 1
            e.doomed = True
            if not self.demote(e):  # the SSD cannot take it now: leave the order untouched
                e.holds -= 1
                e.doomed = False
                return
            self.policy.remove(v, True)
            self.counters.demotions_started += 1
            self.demoting_bytes += self.alloc.slot_bytes(v)
            max_writes -= 1

    def finish_demotion(self, e: Entry, gen: int, ok: bool) -> None:
        """The SSD write started by ``demote`` ended; ``ok`` if the chunk is on SSD now."""
        if e.gen != gen:
            return
        e.doomed = False
        self.demoting_bytes -= self.alloc.slot_bytes(e.slot)
        if ok:
            e.on_ssd = True
        if e.state is State.COMMITTED:
            if ok:
                self._detach(e, "demoted")
            else:
                # The write failed: keep the chunk in memory (no data lost); it is again an
                # ordinary eviction candidate.
                self.policy.insert(e.slot, _fingerprint(e.key))
        self.unhold(e, gen)

    def commit(
        self,
        ns: NamespaceId,
        key: ChunkKey,
        owner: int,
        num_tokens: int,
        checksum: int | None,
        *,
        wanted: bool = False,
    ) -> Entry:
        """Make a reserved chunk visible. ``wanted``: brought in for a reader (an SSD
        promotion), so it enters the eviction policy as used once — under S3-FIFO it is not
        a probation entry that the next few inserts push out before its reader pins it."""
        _check_key(key)
        e = self._index.get(key)
        if e is None or e.state is not State.RESERVED or e.owner != owner or e.ns != ns:
            if self._unfence(owner, key):
                self.counters.late_commits += 1
                raise NotReserved(
                    f"commit of chunk {key.hex()} after its reservation expired "
                    f"({self.config.reserve_timeout_s:g} s); the chunk was not stored"
                )
            raise NotReserved(f"commit of chunk {key.hex()} that this connection did not reserve")
        if not 0 <= num_tokens < 1 << 32:
            raise ValueError(f"num_tokens out of range: {num_tokens}")
        self._drop_reservation(e)
        rheap = self._reserve_heap
        if len(rheap) > 4 * self.reserved + HEAP_SLACK:
            rheap[:] = [
                (x.deadline, x.slot, x.gen)
                for x in self._index.values()
                if x.state is State.RESERVED
            ]
            heapq.heapify(rheap)
        e.state = State.COMMITTED
        e.num_tokens = num_tokens
        e.checksum = checksum
        self.policy.insert(e.slot, _fingerprint(key))
        if wanted:
            self.policy.touch(e.slot)
        self.counters.stored_bytes += e.size
        return e

    def abort(self, ns: NamespaceId, key: ChunkKey, owner: int) -> None:
        """Give up a reservation; a voided one is accepted too (its fence is lifted)."""
        _check_key(key)
        e = self._index.get(key)
        if e is None or e.state is not State.RESERVED or e.owner != owner or e.ns != ns:
            if self._unfence(owner, key):
                return
            raise NotReserved(f"abort of chunk {key.hex()} that this connection did not reserve")
        self._drop_reservation(e)
        del self._index[key]
        self._free(e)
        if self.on_abort is not None:
            self.on_abort(key)

    def _drop_reservation(self, e: Entry) -> None:
        self.reserved -= 1
        keys = self._owner_reserved.get(e.owner)
        if keys is not None:
            keys.discard(e.key)
            if not keys:
                del self._owner_reserved[e.owner]

    def _void(self, e: Entry) -> None:
        """An expired reservation: out of the index, its slot fenced for its owner."""
        self._drop_reservation(e)
        del self._index[e.key]
        e.state = State.DETACHED
        e.holds += 1
        self._voided.setdefault((e.owner, e.key), []).append(e)
        self.fenced_bytes += self.alloc.slot_bytes(e.slot)
        if self.on_abort is not None:
            self.on_abort(e.key)

    def _unfence(self, owner: int, key: ChunkKey) -> bool:
        """Lift the oldest fence of ``owner`` on ``key``; False if there is none."""
        fenced = self._voided.get((owner, key))
        if not fenced:
            return False
        e = fenced.pop(0)
        if not fenced:
            del self._voided[(owner, key)]
        self.fenced_bytes -= self.alloc.slot_bytes(e.slot)
        self.unhold(e, e.gen)
        return True

    @property
    def fenced_slots(self) -> int:
        return sum(len(v) for v in self._voided.values())

    # ------------------------------------------------------------------ reads

    def pin(self, e: Entry, owner: int, lease_s: float, *, count: bool = True) -> Lease:
        """Open a read lease on a committed entry (counts a hit unless ``count=False``)."""
        if len(self._leases) >= self.config.max_leases:
            self.sweep(self.clock())
            if len(self._leases) >= self.config.max_leases:
                raise NoSpace(
                    f"too many open read leases ({self.config.max_leases}); release some first"
                )
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        lease_id = self._next_lease
        self._next_lease += 1
        expires = self.clock() + min(lease_s, self.config.max_lease_s)
        lease = Lease(lease_id, e, owner, expires)
        self._leases[lease_id] = lease
        self._owner_leases.setdefault(owner, set()).add(lease_id)
        heapq.heappush(self._lease_heap, (expires, lease_id))
        if e.pins == 0:
            self.pinned_entries += 1
        e.pins += 1
        if count:
            self.policy.touch(e.slot)
            self.counters.hits += 1
            self.counters.loaded_bytes += e.size
        return lease

    def release(self, lease_ids: list[int] | tuple[int, ...], owner: int) -> None:
        """Close leases (overdue ones too); raises ``NotPinned`` (after closing the valid
        ones) for unknown ids."""
        unknown: list[int] = []
        for lease_id in lease_ids:
            lease = self._leases.get(lease_id)
            if lease is None or lease.owner != owner:
                unknown.append(lease_id)
                continue
            self._close_lease(lease_id, lease)
        if unknown:
            raise NotPinned(
                f"release of lease(s) {unknown} that are not open for this connection "
                "(already released, or never opened)"
            )

    def _close_lease(self, lease_id: int, lease: Lease) -> None:
        del self._leases[lease_id]
        heap = self._lease_heap
        if len(heap) > 4 * len(self._leases) + HEAP_SLACK:
            # Released leases stay in the heap until their deadline; rebuild it when they
            # dominate, so its size stays proportional to the open leases.
            heap[:] = [(x.expires_at, i) for i, x in self._leases.items() if not x.overdue]
            heapq.heapify(heap)
        ids = self._owner_leases.get(lease.owner)
        if ids is not None:
            ids.discard(lease_id)
            if not ids:
                del self._owner_leases[lease.owner]
        if lease.overdue:
            self.overdue_leases -= 1
        e = lease.entry
        e.pins -= 1
        if e.pins == 0:
            self.pinned_entries -= 1
            if e.state is State.DETACHED and e.holds == 0:
                self._free(e)

    def hold(self, e: Entry) -> int:
        """Keep ``e``'s slot from being evicted or reused; returns the generation to unhold."""
        e.holds += 1
        return e.gen

    def unhold(self, e: Entry, gen: int) -> None:
        if e.gen != gen or e.holds <= 0:
            return
        e.holds -= 1
        if e.holds == 0 and e.pins == 0 and e.state is State.DETACHED:
            self._free(e)

    def set_checksum(self, e: Entry, gen: int, checksum: int) -> None:
        if e.gen == gen and e.state is State.COMMITTED and e.checksum is None:
            e.checksum = checksum

    def checksum(self, e: Entry) -> int:
        """The entry's checksum, computed now if the background hash has not finished."""
        if e.checksum is None:
            e.checksum = payload_checksum(self.view(e))
        return e.checksum

    # ------------------------------------------------------------------ removal

    def drop(self, e: Entry, reason: str) -> None:
        """Remove a committed entry from the index (readers keep their pins until release)."""
        if e.state is State.COMMITTED:
            self.policy.remove(e.slot, False)
            self._detach(e, reason)

    def _detach(self, e: Entry, reason: str) -> None:
        del self._index[e.key]
        e.state = State.DETACHED
        ev = self.counters.evictions
        ev[reason] = ev.get(reason, 0) + 1
        if self.on_detach is not None:
            self.on_detach(e)
        if e.pins == 0 and e.holds == 0:
            self._free(e)

    def _free(self, e: Entry) -> None:
        self.used_bytes -= self.alloc.slot_bytes(e.slot)
        self.alloc.free(e.slot)
        e.state = State.FREE
        e.gen += 1

    def clear(self) -> int:
        """Drop every committed chunk (pinned ones leave when released); returns how many."""
        dropped = 0
        for e in list(self._index.values()):
            if e.state is State.COMMITTED:
                self.drop(e, "clear")
                dropped += 1
        return dropped

    def release_owner(self, owner: int) -> None:
        """A connection went away: close its leases, abort its reservations, lift its fences."""
        for lease_id in list(self._owner_leases.get(owner, ())):
            self._close_lease(lease_id, self._leases[lease_id])
        for key in list(self._owner_reserved.get(owner, ())):
            e = self._index[key]
            self.abort(e.ns, key, owner)
        for o, key in [k for k in self._voided if k[0] == owner]:
            while self._unfence(o, key):
                pass

    def sweep(self, now: float) -> None:
        """Mark expired leases overdue and void expired reservations (counted; see the
        module's note on fencing)."""
        heap = self._lease_heap
        while heap and heap[0][0] <= now:
            _, lease_id = heapq.heappop(heap)
            lease = self._leases.get(lease_id)
            if lease is not None and not lease.overdue:
                lease.overdue = True
                self.overdue_leases += 1
                self.counters.leases_expired += 1
                log.warning(
                    "read lease %d of owner %d on %s is overdue; its slot stays pinned until "
                    "it is released or the owner disconnects",
                    lease_id,
                    lease.owner,
                    lease.entry.key.hex(),
                )
        rheap = self._reserve_heap
        while rheap and rheap[0][0] <= now:
            _, slot, gen = heapq.heappop(rheap)
            e = self._entries[slot]
            if e is not None and e.gen == gen and e.state is State.RESERVED:
                self.counters.reservations_expired += 1
                log.warning(
                    "reservation of %s by owner %d expired: voided, its slot fenced until the "
                    "owner commits, aborts or disconnects",
                    e.key.hex(),
                    e.owner,
                )
                self._void(e)

    def verify(self, e: Entry) -> bool:
        """Re-hash the arena bytes of ``e`` against its checksum (False on damage)."""
        if e.checksum is None:
            e.checksum = payload_checksum(self.view(e))
            return True
        return payload_checksum(self.view(e)) == e.checksum

    def close(self) -> None:
        self.arena.close()


def _check_key(key: object) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        got = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
        raise ValueError(f"chunk key must be a {KEY_BYTES}-byte bytes object, got {got}")


def _check_ns(ns: object) -> None:
    if not isinstance(ns, bytes) or len(ns) != KEY_BYTES:
        got = f"{len(ns)} bytes" if isinstance(ns, bytes) else type(ns).__name__
        raise ValueError(f"namespace id must be a {KEY_BYTES}-byte bytes object, got {got}")


def _fingerprint(key: bytes) -> int:
    return int.from_bytes(key[:8], "little")
