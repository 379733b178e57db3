"""CPU tier: reservations, commits, leases, expiry and fencing, eviction (never of a pinned
slot)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from meshkv.chunk import ChunkKey, NamespaceId
from meshkv.errors import NoSpace, NotPinned, NotReserved
from meshkv.tiers.cpu import CpuTier, CpuTierConfig, State

KiB = 1 << 10
NS = NamespaceId(b"n" * 16)
OTHER_NS = NamespaceId(b"o" * 16)
SLOT = 64 * KiB


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "little"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_tier(clock: Clock, slots: int = 4, eviction: str = "lru") -> CpuTier:
    cfg = CpuTierConfig(
        capacity_bytes=slots * SLOT,
        segment_bytes=SLOT,
        min_slot_bytes=SLOT,
        eviction=eviction,
        reserve_timeout_s=10.0,
    )
    return CpuTier(cfg, clock=clock)


@pytest.fixture
def tier(clock: Clock) -> Iterator[CpuTier]:
    t = make_tier(clock)
    yield t
    t.close()


def store(t: CpuTier, i: int, owner: int = 1) -> None:
    e = t.reserve(NS, key(i), SLOT, owner)
    assert e is not None
    t.view(e)[:8] = i.to_bytes(8, "little")
    t.commit(NS, key(i), owner, 16, None)


def test_wrong_key_lengths_rejected(tier: CpuTier) -> None:
    with pytest.raises(ValueError, match="16-byte"):
        tier.reserve(NS, ChunkKey(b"short"), SLOT, 1)
    with pytest.raises(ValueError, match="16-byte"):
        tier.reserve(NamespaceId(b"x"), key(1), SLOT, 1)
    with pytest.raises(ValueError, match="16-byte"):
        tier.commit(NS, ChunkKey(b"y" * 17), 1, 1, None)


def test_commit_or_abort_without_reservation(tier: CpuTier) -> None:
    with pytest.raises(NotReserved, match="did not reserve"):
        tier.commit(NS, key(1), 1, 16, None)
    assert tier.reserve(NS, key(1), SLOT, owner=1) is not None
    with pytest.raises(NotReserved):
        tier.commit(NS, key(1), 2, 16, None)  # another connection's reservation
    with pytest.raises(NotReserved):
        tier.commit(OTHER_NS, key(1), 1, 16, None)
    tier.abort(NS, key(1), 1)
    with pytest.raises(NotReserved):
        tier.abort(NS, key(1), 1)


def test_reserve_of_stored_key_returns_none(tier: CpuTier) -> None:
    store(tier, 1)
    assert tier.reserve(NS, key(1), SLOT, 2) is None


def test_namespace_mismatch_is_a_counted_miss(tier: CpuTier) -> None:
    store(tier, 1)
    assert tier.find(OTHER_NS, key(1)) is None
    assert tier.counters.namespace_mismatches == 1
    assert tier.find(NS, key(1)) is not None


def test_double_release_raises_not_pinned(tier: CpuTier) -> None:
    store(tier, 1)
    e = tier.find(NS, key(1))
    assert e is not None
    lease = tier.pin(e, 7, 5.0)
    with pytest.raises(NotPinned):
        tier.release([lease.lease_id], owner=8)  # not this owner's lease
    tier.release([lease.lease_id], 7)
    with pytest.raises(NotPinned, match="already released"):
        tier.release([lease.lease_id], 7)
    assert e.pins == 0


def test_all_pinned_gives_no_space_then_works_after_release(tier: CpuTier) -> None:
    leases = []
    for i in range(4):
        store(tier, i)
        e = tier.find(NS, key(i))
        assert e is not None
        leases.append(tier.pin(e, 1, 30.0).lease_id)
    with pytest.raises(NoSpace, match="4 chunks pinned"):
        tier.reserve(NS, key(99), SLOT, 1)
    tier.release(leases[2:3], 1)
    assert tier.reserve(NS, key(99), SLOT, 1) is not None
    assert tier.get(key(2)) is None  # the released one was evicted
    for i in (0, 1, 3):
        assert tier.get(key(i)) is not None


def test_every_slot_reserved_gives_no_space(tier: CpuTier) -> None:
    for i in range(4):
        assert tier.reserve(NS, key(i), SLOT, 1) is not None
    with pytest.raises(NoSpace, match="4 reserved"):
        tier.reserve(NS, key(9), SLOT, 1)


def test_no_space_says_what_keeps_every_slot(tier: CpuTier) -> None:
    """One slot each pinned, reserved, held by background work; the fourth is evicted
    for the next chunk, and then nothing can go: the message counts each kind."""
    for i in range(3):
        store(tier, i)
    e0, e1 = tier.find(NS, key(0)), tier.find(NS, key(1))
    assert e0 is not None and e1 is not None
    tier.pin(e0, 1, 60.0)
    tier.hold(e1)  # as an SSD write or a checksum does
    assert tier.reserve(NS, key(3), SLOT, 1) is not None
    use = tier.slot_use()
    assert (use.pinned, use.reserved, use.held, use.evictable) == (1, 1, 1, 1)
    assert tier.reserve(NS, key(4), SLOT, 1) is not None  # chunk 2 evicted
    assert tier.get(key(2)) is None
    with pytest.raises(NoSpace) as err:
        tier.reserve(NS, key(5), SLOT, 1)
    assert ("1 chunks pinned by readers, 2 reserved by writers, 1 held by SSD writes, "
            "checksums or expired reservations, 0 evictable") in str(err.value)  # fmt: skip


def test_expired_lease_is_overdue_and_keeps_its_slot(tier: CpuTier, clock: Clock) -> None:
    store(tier, 1)
    e = tier.find(NS, key(1))
    assert e is not None
    lease = tier.pin(e, 1, 2.0)
    clock.now += 1.0
    tier.sweep(clock.now)
    assert tier.overdue_leases == 0
    clock.now += 1.5
    tier.sweep(clock.now)
    tier.sweep(clock.now)  # counted once
    assert tier.counters.leases_expired == 1 and tier.overdue_leases == 1
    # The reader may still be copying: the slot is neither evicted nor reused.
    for i in range(2, 12):
        store(tier, i)
    assert tier.find(NS, key(1)) is e and e.pins == 1
    assert bytes(tier.view(e)[:8]) == (1).to_bytes(8, "little")
    tier.release([lease.lease_id], 1)  # a late release is accepted
    assert e.pins == 0 and tier.overdue_leases == 0 and tier.open_leases == 0
    with pytest.raises(NotPinned):
        tier.release([lease.lease_id], 1)


def test_overdue_lease_goes_with_its_owner(tier: CpuTier, clock: Clock) -> None:
    store(tier, 1)
    e = tier.find(NS, key(1))
    assert e is not None
    tier.pin(e, 7, 1.0)
    clock.now += 2.0
    tier.sweep(clock.now)
    assert tier.overdue_leases == 1
    tier.release_owner(7)
    assert e.pins == 0 and tier.overdue_leases == 0


def test_expired_reservation_is_voided_and_fenced(tier: CpuTier, clock: Clock) -> None:
    late = tier.reserve(NS, key(1), SLOT, 1)
    assert late is not None
    slot = late.slot
    clock.now += 11.0
    tier.sweep(clock.now)
    assert tier.counters.reservations_expired == 1
    assert not tier.contains(key(1)) and tier.fenced_slots == 1
    assert tier.used_bytes == SLOT  # fenced: the late writer may still be copying
    # Fill the tier over and over: the fenced slot is never handed out.
    for i in range(2, 20):
        store(tier, i)
        e = tier.find(NS, key(i))
        assert e is not None and e.slot != slot
    # Someone else may store the same key meanwhile (into another slot).
    store(tier, 1, owner=2)
    tier.view(late)[:8] = b"LATELATE"  # the late copy lands where nobody reads
    got = tier.find(NS, key(1))
    assert got is not None and bytes(tier.view(got)[:8]) == (1).to_bytes(8, "little")
    with pytest.raises(NotReserved, match="expired"):
        tier.commit(NS, key(1), 1, 16, None)  # the late commit is refused...
    assert tier.fenced_slots == 0 and tier.counters.late_commits == 1  # ...and lifts the fence
    store(tier, 30)  # the slot is usable again
    with pytest.raises(NotReserved):
        tier.commit(NS, key(1), 1, 16, None)


def test_voided_reservation_abort_and_disconnect_lift_the_fence(
    tier: CpuTier, clock: Clock
) -> None:
    assert tier.reserve(NS, key(1), SLOT, 1) is not None
    assert tier.reserve(NS, key(2), SLOT, 3) is not None
    clock.now += 11.0
    tier.sweep(clock.now)
    assert tier.fenced_slots == 2 and tier.used_bytes == 2 * SLOT
    tier.abort(NS, key(1), 1)  # the writer gave up late: accepted, fence lifted
    tier.release_owner(3)  # the other writer disconnected
    assert tier.fenced_slots == 0 and tier.used_bytes == 0 and tier.fenced_bytes == 0
    with pytest.raises(NotReserved):
        tier.abort(NS, key(1), 1)


def test_release_owner_frees_leases_and_reservations(tier: CpuTier) -> None:
    store(tier, 1)
    e = tier.find(NS, key(1))
    assert e is not None
    tier.pin(e, 5, 30.0)
    tier.reserve(NS, key(2), SLOT, 5)
    tier.release_owner(5)
    assert e.pins == 0 and not tier.contains(key(2)) and tier.open_leases == 0


def test_clear_keeps_pinned_bytes_until_release(tier: CpuTier) -> None:
    store(tier, 1)
    e = tier.find(NS, key(1))
    assert e is not None
    lease = tier.pin(e, 1, 30.0)
    assert tier.clear() == 1
    assert tier.get(key(1)) is None and e.state is State.DETACHED
    assert tier.used_bytes == SLOT  # still held by the reader
    tier.release([lease.lease_id], 1)
    assert tier.used_bytes == 0


def test_a_half_size_chunk_in_a_full_tier_evicts_one_chunk_not_a_segment(clock: Clock) -> None:
    # Two segments of four whole-chunk slots, all stored: a chunk of half the size (the
    # connector's cut of a partial chunk) has no class of its own yet. It takes the slot
    # of the one least recently used chunk instead of emptying a segment for its class.
    cfg = CpuTierConfig(
        capacity_bytes=8 * SLOT, segment_bytes=4 * SLOT, min_slot_bytes=SLOT // 4,
        eviction="lru", reserve_timeout_s=10.0,
    )  # fmt: skip
    t = CpuTier(cfg, clock=clock)
    try:
        for i in range(8):
            store(t, i)
        e = t.reserve(NS, key(100), SLOT // 2, 1)
        assert e is not None and e.size == SLOT // 2
        t.commit(NS, key(100), 1, 8, None)
        assert sum(t.counters.evictions.values()) == 1
        assert not t.contains(key(0))  # the least recently used one went
        assert all(t.contains(key(i)) for i in range(1, 8))
        assert t.contains(key(100)) and t.alloc.slot_bytes(e.slot) == SLOT
    finally:
        t.close()


@pytest.mark.parametrize("eviction", ["lru", "s3fifo"])
def test_random_ops_never_evict_a_pinned_slot(clock: Clock, eviction: str) -> None:
    rng = random.Random(1234)
    tier = make_tier(clock, slots=8, eviction=eviction)
    try:
        pinned: dict[int, tuple[ChunkKey, int, bytes]] = {}  # lease -> key, offset, bytes
        for step in range(4000):
            op = rng.random()
            k = key(rng.randrange(40))
            if op < 0.5:
                try:
                    e = tier.reserve(NS, k, rng.choice([SLOT // 2, SLOT]), 1)
                except NoSpace:
                    assert tier.pinned_entries + tier.reserved >= 8
                    continue
                if e is None:
                    continue
                tier.view(e)[:16] = k
                tier.view(e)[16:24] = step.to_bytes(8, "little")
                if rng.random() < 0.1:
                    tier.abort(NS, k, 1)
                else:
                    tier.commit(NS, k, 1, 1, None)
            elif op < 0.8:
                e = tier.find(NS, k)
                if e is not None and len(pinned) < 6:
                    lease = tier.pin(e, 1, 1000.0)
                    pinned[lease.lease_id] = (k, e.offset, bytes(tier.view(e)[:24]))
            elif pinned:
                lease_id = rng.choice(list(pinned))
                del pinned[lease_id]
                tier.release([lease_id], 1)
            # invariant 4: every pinned chunk's bytes are still there, untouched
            for k2, offset, data in pinned.values():
                assert bytes(tier.arena.view(offset, 24)) == data
                e2 = tier.get(k2)
                assert e2 is not None and e2.offset == offset
    finally:
        tier.close()


def test_scan_resistance_in_the_tier(clock: Clock) -> None:
    def survivors(eviction: str) -> int:
        t = make_tier(clock, slots=20, eviction=eviction)
        try:
            hot = range(10)
            for _ in range(3):
                for i in hot:
                    if t.get(key(i)) is None:
                        store(t, i)
                    e = t.find(NS, key(i))
                    assert e is not None
                    t.release([t.pin(e, 1, 5.0).lease_id], 1)
            for i in range(1000, 1060):  # one-hit scan, 3x the capacity
                store(t, i)
            return sum(t.get(key(i)) is not None for i in hot)
        finally:
            t.close()

    assert survivors("s3fifo") == 10
    assert survivors("lru") == 0


def test_an_eviction_passes_over_chunks_whose_ssd_write_cannot_start(clock: Clock) -> None:
    """With the SSD's write queue full, a chunk only in memory would be dropped if evicted:
    a chunk already on SSD goes instead, even if it is younger. Only when every candidate
    is such a chunk is one dropped (counted)."""
    queue_full = True
    copies: list[ChunkKey] = []

    def demote_copy(e: Any) -> bool:
        if queue_full:
            return False
        copies.append(e.key)
        return True

    cfg = CpuTierConfig(
        capacity_bytes=4 * SLOT, segment_bytes=SLOT, min_slot_bytes=SLOT,
        eviction="lru", reserve_timeout_s=10.0,
    )  # fmt: skip
    t = CpuTier(cfg, clock=clock, demote=lambda e: False, demote_copy=demote_copy)
    for i in range(4):
        store(t, i)
    for i in (2, 3):  # the two youngest were written through to SSD
        e = t.get(key(i))
        assert e is not None
        e.on_ssd = True
    store(t, 4)  # the LRU victim (0) is only in memory: 2 leaves instead
    assert t.contains(key(0)) and t.contains(key(1)) and not t.contains(key(2))
    store(t, 5)
    assert not t.contains(key(3))
    assert t.counters.demotions_dropped == 0
    store(t, 6)  # nothing on SSD is left: the oldest chunk only in memory is dropped
    assert (
        t.counters.demotions_dropped == 1 and len([k for k in range(7) if t.contains(key(k))]) == 4
    )
    queue_full = False
    store(t, 7)  # with room in the queue, the victim is copied out and written
    assert t.counters.demotions_dropped == 1 and len(copies) == 1
    t.close()


def test_a_full_tier_evicts_a_much_read_chunk_beside_pinned_ones(clock: Clock) -> None:
    """Seven chunks pinned, the eighth unpinned but read often: a new chunk still finds it.
    S3-FIFO passes over a chunk once per read before proposing it, and the walk of
    ``len + 1`` proposals ended first, so the tier said "full" with a chunk it could evict
    (CI run BU: 5 pinned, 3 evictable, nothing evicted)."""
    t = make_tier(clock, slots=8, eviction="s3fifo")
    for i in range(8):
        store(t, i)
    for i in range(1, 8):
        e = t.get(key(i))
        assert e is not None
        t.release([t.pin(e, 2, 5.0).lease_id], 2)
    store(t, 8)  # evicts 0; the read chunks move from probation to main
    leases = [t.pin(e, 2, 5.0, count=False).lease_id for i in range(1, 8) if (e := t.get(key(i)))]
    for _ in range(4):  # walks with every chunk pinned wear the reads down
        extra = t.pin(e8, 2, 5.0, count=False) if (e8 := t.get(key(8))) else None
        assert extra is not None
        with pytest.raises(NoSpace):
            store(t, 99)
        t.release([extra.lease_id], 2)
    e8 = t.get(key(8))
    assert e8 is not None
    for _ in range(3):
        t.release([t.pin(e8, 2, 5.0).lease_id], 2)
    store(t, 100)
    assert t.contains(key(100)) and not t.contains(key(8))
    assert all(t.contains(key(i)) for i in range(1, 8))
    t.release(leases, 2)
    t.close()


def test_a_chunk_brought_in_for_a_reader_outlives_probation(clock: Clock) -> None:
    """S3-FIFO puts new chunks on probation, the first to go; a chunk promoted or pulled
    for a reader (``wanted``) has been asked for again, so it is not evicted by the next
    few stores before its reader pins it."""

    def kept(wanted: bool) -> bool:
        t = make_tier(clock, slots=20, eviction="s3fifo")
        try:
            for i in range(10):  # earlier chunks, read once (main queue)
                store(t, i)
                e = t.find(NS, key(i))
                assert e is not None
                t.release([t.pin(e, 1, 5.0).lease_id], 1)
            e = t.reserve(NS, key(500), SLOT, 1)
            assert e is not None
            t.commit(NS, key(500), 1, 16, None, wanted=wanted)
            for i in range(1000, 1012):  # other requests' new chunks
                store(t, i)
            return t.get(key(500)) is not None
        finally:
            t.close()

    assert kept(wanted=True)
    assert not kept(wanted=False)
