"""Store: CPU + SSD together (demotion, promotion, persistence, degrade, verification)."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from meshkv.chunk import ChunkKey, NamespaceId, payload_checksum
from meshkv.errors import ConfigError, NoSpace, NotPinned
from meshkv.puller import Puller
from meshkv.store import INLINE_HASH_BYTES, Pin, Slot, Store, StoreConfig, Tier
from meshkv.tiers.arena import SHM_DIR
from meshkv.tiers.cpu import Entry
from meshkv.tiers.ssd import file_bytes
from tests.helpers.stores import Recorder, store_config

KiB = 1 << 10
SLOT = 64 * KiB
NS = NamespaceId(b"n" * 16)
OTHER = NamespaceId(b"o" * 16)


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "big"))


def data(i: int) -> bytes:
    return (i.to_bytes(4, "little") * (SLOT // 4))[:SLOT]


def config(ssd: Path | None, slots: int = 8, **kw: Any) -> StoreConfig:
    return store_config(
        cpu_bytes=slots * SLOT,
        segment_bytes=SLOT,
        min_slot_bytes=SLOT,
        ssd_dir=None if ssd is None else str(ssd),
        ssd_bytes=1 << 30,
        ssd_fsync=False,
        **kw,
    )


def put(s: Store, i: int, owner: int = 1) -> None:
    slot = s.reserve(NS, key(i), SLOT, owner)
    assert slot is not None
    view = s.payload(slot)
    view[:] = data(i)
    view.release()
    s.commit(NS, key(i), owner, 16)


async def settle(s: Store) -> None:
    """Wait until background checksums and SSD writes are done."""
    for _ in range(500):
        if not s._tasks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("background work did not finish")


async def read_bytes(s: Store, i: int) -> bytes | None:
    """Read one chunk as a reader of the agent would: promoted from SSD first if needed
    (the puller's first steps, done here with the store's own primitive)."""
    if s.on_ssd(NS, key(i)):
        await s.promote(NS, key(i))
    (pin,) = await s.read(NS, [key(i)], 1, 5.0)
    if pin is None:
        return None
    view = s.payload(pin.slot)
    out = bytes(view)
    view.release()
    s.release([pin.lease_id], 1)
    return out


def test_config_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="eviction"):
        store_config(eviction="random")
    with pytest.raises(ConfigError, match="segment_bytes"):
        store_config(segment_bytes=3 << 20)
    with pytest.raises(ConfigError, match="capacity_bytes"):
        store_config(ssd_dir="/tmp/x", ssd_bytes=0)
    with pytest.raises(ConfigError, match="shm_dir"):
        store_config(shm_dir="/nonexistent/shm")
    with pytest.raises(ConfigError, match="writeback_headroom"):
        store_config(writeback_headroom=1.5)
    with pytest.raises(ConfigError, match="at least one segment"):
        store_config(cpu_bytes=1 << 20)


@run_async
async def test_commit_read_checksum_and_namespace(tmp_path: Path) -> None:
    s = Store(config(None))
    await s.start()
    seen = Recorder()
    s.add_listener(seen)
    put(s, 1)
    assert s.lookup(NS, [key(1), key(2)]) == [Tier.CPU, None]
    assert s.checksum_of(key(1)) == payload_checksum(data(1))
    assert await read_bytes(s, 1) == data(1)
    await settle(s)
    (pin,) = await s.read(NS, [key(1)], 1, 5.0)
    assert pin is not None and pin.checksum == payload_checksum(data(1))
    s.release([pin.lease_id], 1)
    with pytest.raises(NotPinned):
        s.release([pin.lease_id], 1)
    assert s.lookup(OTHER, [key(1)]) == [None]  # never across namespaces
    assert await s.read(OTHER, [key(1)], 1, 5.0) == [None]
    with pytest.raises(ValueError, match="16-byte"):
        s.lookup(NS, [ChunkKey(b"abc")])
    stats = s.snapshot()
    assert stats.namespace_mismatches == 2 and stats.tiers["cpu"].chunks == 1
    assert s.clear() == 1
    assert seen.added == [key(1)] and seen.from_engine == [True]  # owner 1: an engine
    assert seen.dropped_keys == [key(1)]
    slot = s.reserve(NS, key(2), SLOT, 1)
    assert slot is not None
    s.abort(NS, key(2), 1)
    assert seen.aborted_keys == [key(2)]
    arena = os.path.join(SHM_DIR, s.arena_name)
    assert os.path.exists(arena)
    await s.close(asyncio.get_running_loop().time() + 5)
    assert not os.path.exists(arena)


@run_async
async def test_checksum_deferred_until_the_chunk_leaves(tmp_path: Path) -> None:
    s = Store(config(tmp_path, slots=8))
    await s.start()
    put(s, 1)  # no checksum given, no verify_reads, no write-through: nothing is hashed
    e = s.cpu.get(key(1))
    assert e is not None and e.checksum is None
    assert s.snapshot().checksums_pending == 0 and not s._tasks
    (pin,) = await s.read(NS, [key(1)], 1, 5.0)
    assert pin is not None and pin.checksum is None
    # a peer send hashes the pinned slot and remembers the value
    assert await s.checksum_for(pin) == payload_checksum(data(1))
    assert e.checksum == payload_checksum(data(1))
    s.release([pin.lease_id], 1)
    put(s, 2)
    e2 = s.cpu.get(key(2))
    assert e2 is not None
    s.cpu.view(e2)[0] ^= 0xFF  # bytes change before the chunk ever leaves the arena
    await s.close(asyncio.get_running_loop().time() + 5)  # persists: hashes, then writes
    s2 = Store(config(tmp_path, slots=8))
    await s2.start()
    assert s2.checksum_of(key(1)) == payload_checksum(data(1))
    got = await read_bytes(s2, 2)  # served from SSD only if it matches its checksum
    assert got is not None and got[0] == data(2)[0] ^ 0xFF and got[1:] == data(2)[1:]
    await s2.close(asyncio.get_running_loop().time() + 5)


@run_async
async def test_chunks_between_nodes_are_hashed_inline_when_small(tmp_path: Path) -> None:
    """A pool thread hands its result back only when it gets the GIL from the busy loop
    (1.3 ms median for a 2 MiB pull measured so): small payloads never leave the loop."""
    s = Store(config(tmp_path, slots=8))
    await s.start()
    try:
        small = memoryview(os.urandom(INLINE_HASH_BYTES))
        inline = s.hash(small, inline=True)
        with pytest.raises(StopIteration) as finished:
            inline.send(None)  # done at the first step: never suspended
        assert finished.value.value == payload_checksum(small)
        large = memoryview(os.urandom(INLINE_HASH_BYTES + 1))
        pooled = s.hash(large, inline=True)
        waiting = pooled.send(None)  # suspended on the pool's future
        assert isinstance(waiting, asyncio.Future)
        await asyncio.wait([waiting])
        with pytest.raises(StopIteration) as finished:
            pooled.send(None)
        assert finished.value.value == payload_checksum(large)
        background = s.hash(small)  # not asked for inline (SSD writes): the pool
        assert isinstance(background.send(None), asyncio.Future)
        background.close()
    finally:
        await s.close(asyncio.get_running_loop().time() + 5)


@run_async
async def test_verify_reads_and_write_through_hash_at_commit(tmp_path: Path) -> None:
    for kw in ({"verify_reads": True}, {"write_through": True}):
        s = Store(config(tmp_path / next(iter(kw)), slots=8, **kw))
        await s.start()
        put(s, 1)
        await settle(s)
        e = s.cpu.get(key(1))
        assert e is not None and e.checksum == payload_checksum(data(1)), kw
        assert s.snapshot().checksums_pending == 0
        await s.close(asyncio.get_running_loop().time() + 5)


@run_async
async def test_demote_to_ssd_and_promote_back(tmp_path: Path) -> None:
    s = Store(config(tmp_path, slots=8))
    await s.start()
    for i in range(20):
        put(s, i)
        await asyncio.sleep(0.005)
    await settle(s)
    tiers = s.lookup(NS, [key(i) for i in range(20)])
    assert None not in tiers and Tier.SSD in tiers
    st = s.snapshot()
    assert st.tiers["cpu"].usage_bytes <= st.tiers["cpu"].capacity_bytes
    assert st.tiers["ssd"].chunks >= 12 and st.demotions >= 12
    for i in range(20):  # every byte comes back identical, from whichever tier
        assert await read_bytes(s, i) == data(i), i
    assert s.snapshot().promotions >= 12
    await s.close(asyncio.get_running_loop().time() + 5)


@run_async
async def test_close_persists_and_restart_serves(tmp_path: Path) -> None:
    n = 20  # more than the SSD write queue (8): close waits for queue slots
    s = Store(config(tmp_path, slots=32))
    await s.start()
    for i in range(n):
        put(s, i)
    assert s.lookup(NS, [key(i) for i in range(n)]) == [Tier.CPU] * n
    await s.close(asyncio.get_running_loop().time() + 10)
    s2 = Store(config(tmp_path, slots=32))
    await s2.start()
    assert s2.lookup(NS, [key(i) for i in range(n)]) == [Tier.SSD] * n
    for i in range(n):
        assert await read_bytes(s2, i) == data(i)
    assert s2.lookup(NS, [key(0)]) == [Tier.CPU]  # promoted
    await s2.close(asyncio.get_running_loop().time() + 5)


@run_async
async def test_enospc_degrades_without_losing_cpu_data(tmp_path: Path) -> None:
    def hook(op: str, path: str) -> None:
        if op == "write":
            raise OSError(errno.ENOSPC, "No space left on device", path)

    s = Store(config(tmp_path, slots=8, write_through=True), ssd_fault_hook=hook)
    await s.start()
    for i in range(6):
        put(s, i)
    await settle(s)
    st = s.snapshot()
    assert st.ssd_degraded and st.ssd_write_errors >= 1
    for i in range(6):  # nothing was lost from memory
        assert await read_bytes(s, i) == data(i)
    await s.close(asyncio.get_running_loop().time() + 2)


@run_async
async def test_verify_reads_catches_damaged_arena_bytes(tmp_path: Path) -> None:
    s = Store(config(None, verify_reads=True))
    await s.start()
    put(s, 1)
    await settle(s)
    e = s.cpu.get(key(1))
    assert e is not None
    s.cpu.view(e)[10] ^= 0xFF  # a stray writer scribbles over a committed chunk
    assert await s.read(NS, [key(1)], 1, 5.0) == [None]
    st = s.snapshot()
    assert st.checksum_failures == 1 and s.lookup(NS, [key(1)]) == [None]
    await s.close(asyncio.get_running_loop().time() + 2)


@run_async
async def test_corrupt_ssd_chunk_is_a_miss_through_the_store(tmp_path: Path) -> None:
    s = Store(config(tmp_path))
    await s.start()
    put(s, 1)
    await s.close(asyncio.get_running_loop().time() + 5)
    (path,) = tmp_path.rglob("*.mkv")  # the whole walk: a dropped scandir iterator warns
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40
    path.write_bytes(raw)
    s2 = Store(config(tmp_path))
    await s2.start()
    assert s2.lookup(NS, [key(1)]) == [Tier.SSD]
    assert not await s2.promote(NS, key(1))
    assert await s2.read(NS, [key(1)], 1, 5.0) == [None]
    st = s2.snapshot()
    assert st.checksum_failures == 1 and st.miss_chunks == 1
    assert s2.lookup(NS, [key(1)]) == [None]
    assert s2.snapshot().tiers["cpu"].usage_bytes == 0  # the promotion slot was given back
    await s2.close(asyncio.get_running_loop().time() + 2)


@run_async
async def test_overdue_lease_counted_in_snapshot(tmp_path: Path) -> None:
    s = Store(config(None))
    await s.start()
    put(s, 1)
    (pin,) = await s.read(NS, [key(1)], 1, 0.05)
    assert pin is not None
    await asyncio.sleep(0.1)
    s.sweep()
    st = s.snapshot()
    assert st.leases_expired == 1 and st.leases_overdue == 1 and st.leases_open == 1
    s.release([pin.lease_id], 1)
    st = s.snapshot()
    assert st.leases_overdue == 0 and st.leases_open == 0
    with pytest.raises(NotPinned):
        s.release([pin.lease_id], 1)
    await s.close(asyncio.get_running_loop().time() + 2)


@run_async
async def test_mixed_chunk_sizes_share_the_arena(tmp_path: Path) -> None:
    """Small chunks fill the arena, then big ones take whole segments back (and reverse)."""
    seg = 256 * KiB
    cfg = store_config(cpu_bytes=4 * seg, segment_bytes=seg, min_slot_bytes=16 * KiB)
    s = Store(cfg)
    await s.start()
    sizes = [16 * KiB] * 64 + [seg] * 6 + [128 * KiB] * 10 + [16 * KiB] * 20
    stored: dict[ChunkKey, bytes] = {}
    for i, size in enumerate(sizes):
        k = key(i)
        slot = s.reserve(NS, k, size, 1)
        assert slot is not None
        blob = os.urandom(size)
        view = s.payload(slot)
        view[:] = blob
        view.release()
        s.commit(NS, k, 1, 16)
        stored[k] = blob
        st = s.snapshot().tiers["cpu"]
        assert st.usage_bytes <= st.capacity_bytes
    present = 0
    for k, blob in stored.items():
        (pin,) = await s.read(NS, [k], 1, 5.0)
        if pin is None:
            continue
        present += 1
        view = s.payload(pin.slot)
        assert bytes(view) == blob  # no slot ever overlapped another
        view.release()
        s.release([pin.lease_id], 1)
    assert present >= 20
    await s.close(asyncio.get_running_loop().time() + 2)


@run_async
async def test_real_enospc_in_write_back_keeps_serving(tmp_path: Path) -> None:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        s = Store(config(mnt, slots=4))  # the 1 GiB cap is far above the 256 KiB disk
        await s.start()
        for i in range(12):
            put(s, i)
            await asyncio.sleep(0.01)
        await settle(s)
        st = s.snapshot()
        assert st.ssd_degraded and st.ssd_write_errors >= 1
        assert st.tiers["ssd"].usage_bytes == sum(f.stat().st_size for f in mnt.rglob("*.mkv"))
        assert list(mnt.rglob("*.tmp")) == []
        # the newest chunks are still served from memory, the oldest from disk
        assert await read_bytes(s, 11) == data(11)
        assert await read_bytes(s, 0) == data(0)
        put(s, 100)  # and new stores still work
        assert await read_bytes(s, 100) == data(100)
        await s.close(asyncio.get_running_loop().time() + 2)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize(("seed", "slow_disk"), [(1, False), (2, False), (5, True), (9, True)])
@run_async
async def test_random_workload_serves_only_exact_bytes(
    tmp_path: Path, seed: int, slow_disk: bool
) -> None:
    """Invariants 1, 4, 5 under a seeded mix of stores, reads, pins, evictions, clears.

    A slow disk (0-20 ms per I/O) keeps writes in flight while the same keys are stored,
    read and cleared again.
    """
    rng = random.Random(seed)
    disk_rng = random.Random(seed)

    def slow(op: str, path: str) -> None:
        if slow_disk:
            time.sleep(disk_rng.random() * 0.02)

    cap = 10 * file_bytes(SLOT, aligned=True)
    cfg = store_config(
        cpu_bytes=8 * SLOT,
        segment_bytes=SLOT,
        min_slot_bytes=SLOT,
        eviction=rng.choice(["lru", "s3fifo"]),
        ssd_dir=str(tmp_path),
        ssd_bytes=cap,
        ssd_fsync=False,
        ssd_write_queue=2,
    )
    s = Store(cfg, ssd_fault_hook=slow)
    await s.start()
    try:
        await _random_workload(s, rng, tmp_path, cap)
    finally:  # a failure leaves no arena behind for the next test to find
        await s.close(asyncio.get_running_loop().time() + 5)


async def _random_workload(s: Store, rng: random.Random, tmp_path: Path, cap: int) -> None:
    puller = Puller(s)
    truth: dict[ChunkKey, bytes] = {}
    held: list[tuple[int, ChunkKey, bytes, Slot]] = []
    for step in range(400):
        op = rng.random()
        if op < 0.4:
            k = key(rng.randrange(60))
            try:
                slot = s.reserve(NS, k, SLOT, 1)
            except NoSpace:
                # Only when no slot can go: pinned (at most 6 by this loop), reserved, or
                # held by SSD writes the slow disk keeps in flight (CI run BM: 5 pinned, 3
                # held; the old check, 6 pinned, assumed the writes were done). Run BU: 3
                # evictable beside 5 pinned, the S3-FIFO walk too short (fixed, test_cpu_tier).
                use = s.cpu.slot_use()
                assert use.evictable == 0, use
                assert use.pinned + use.reserved + use.held == 8, use
                assert use.pinned == len(held), use
                slot = None
            if slot is not None:
                blob = rng.randbytes(SLOT)
                view = s.payload(slot)
                view[:] = blob
                view.release()
                s.commit(NS, k, 1, 16)
                truth[k] = blob
        elif op < 0.8:
            ks = [key(rng.randrange(60)) for _ in range(rng.randint(1, 3))]
            await puller.resident(NS, ks, 0.0)  # promotes what is on SSD, single-flight
            pins = await s.read(NS, ks, 1, 60.0)
            for k, pin in zip(ks, pins, strict=True):
                if pin is None:
                    continue
                view = s.payload(pin.slot)
                assert bytes(view) == truth[k], (step, k.hex())
                view.release()
                if len(held) < 6 and rng.random() < 0.5:
                    held.append((pin.lease_id, k, truth[k], pin.slot))
                else:
                    s.release([pin.lease_id], 1)
        elif op < 0.97 and held:
            lease_id, k, blob, slot = held.pop(rng.randrange(len(held)))
            view = s.payload(slot)
            assert bytes(view) == blob  # a pinned slot was never reused (invariant 4)
            view.release()
            s.release([lease_id], 1)
        elif op >= 0.99:
            s.clear()
            truth.clear()
        ssd = s.snapshot().tiers["ssd"]
        assert ssd.usage_bytes <= cap  # invariant 5
        if rng.random() < 0.3:
            await asyncio.sleep(0.002)
    for lease_id, _, blob, slot in held:
        view = s.payload(slot)
        assert bytes(view) == blob
        view.release()
        s.release([lease_id], 1)
    await settle(s)
    st = s.snapshot()
    assert st.promotions > 0 and st.demotions > 0  # both tiers were exercised
    on_disk = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert on_disk <= cap


@run_async
async def test_listener_sees_drops_only_when_a_key_leaves_every_tier(tmp_path: Path) -> None:
    cap = 3 * file_bytes(SLOT, aligned=True)
    s = Store(_cfg(tmp_path, cap))
    await s.start()
    seen = Recorder()
    s.add_listener(seen)
    for i in range(6):  # 2 fit in memory, 3 on disk: key 0 leaves both tiers
        put(s, i)
        await settle(s)
    assert seen.added == [key(i) for i in range(6)]
    assert seen.dropped_keys == [key(0)]  # keys 1..3 moved to SSD: not dropped
    tiers = s.lookup(NS, [key(i) for i in range(6)])
    assert tiers == [None, Tier.SSD, Tier.SSD, Tier.SSD, Tier.CPU, Tier.CPU]
    await s.close(asyncio.get_running_loop().time() + 5)


def clean(e: Entry) -> bool:
    return e.on_ssd


def _cfg(ssd: Path, ssd_bytes: int) -> StoreConfig:
    return store_config(
        cpu_bytes=2 * SLOT,
        segment_bytes=SLOT,
        min_slot_bytes=SLOT,
        ssd_dir=str(ssd),
        ssd_bytes=ssd_bytes,
        ssd_fsync=False,
        writeback_headroom=0.0,
        persist_on_shutdown=False,
    )


@run_async
async def test_concurrent_reads_share_one_promotion(tmp_path: Path) -> None:
    s = Store(config(tmp_path))
    await s.start()
    put(s, 1)
    await s.close(asyncio.get_running_loop().time() + 5)
    s2 = Store(config(tmp_path))
    await s2.start()
    puller = Puller(s2)

    async def read(keys: list[ChunkKey], owner: int) -> list[Pin | None]:
        await puller.resident(NS, keys, 0.0)
        return await s2.read(NS, keys, owner, 5.0)

    a, b = await asyncio.gather(read([key(1)], 1), read([key(1), key(1)], 2))
    pins = [*a, *b]
    assert all(p is not None for p in pins)
    assert len({p.slot for p in pins if p is not None}) == 1
    assert s2.snapshot().promotions == 1
    s2.release([a[0].lease_id], 1)  # type: ignore[union-attr]
    s2.release_owner(2)
    st = s2.snapshot()
    assert st.leases_open == 0 and st.pinned_chunks == 0
    await s2.close(asyncio.get_running_loop().time() + 5)


@run_async
async def test_release_owner_aborts_reservations_and_expired_reservation_swept(
    tmp_path: Path,
) -> None:
    s = Store(config(None, reserve_timeout_s=0.05))
    await s.start()
    assert s.reserve(NS, key(1), SLOT, 9) is not None
    s.release_owner(9)
    assert s.reserve(NS, key(1), SLOT, 10) is not None  # free again
    await asyncio.sleep(0.1)
    s.sweep()
    st = s.snapshot()
    assert st.reservations_expired == 1 and st.reservations_open == 0 and st.fenced_slots == 1
    assert st.tiers["cpu"].usage_bytes == SLOT  # fenced until owner 10 is done
    s.release_owner(10)
    st = s.snapshot()
    assert st.fenced_slots == 0 and st.tiers["cpu"].usage_bytes == 0
    await s.close(asyncio.get_running_loop().time() + 2)


@run_async
async def test_key_being_written_to_ssd_is_not_reserved_again(tmp_path: Path) -> None:
    gate = threading.Event()

    def hook(op: str, path: str) -> None:
        if op == "write":
            assert gate.wait(5.0)

    s = Store(_cfg(tmp_path, 1 << 30), ssd_fault_hook=hook)
    await s.start()
    for i in range(3):  # 2 slots: storing key 2 evicts key 0 into a (blocked) SSD write
        put(s, i)
    await asyncio.sleep(0.05)
    assert s.reserve(NS, key(0), SLOT, 1) is None  # already being stored
    assert s.lookup(NS, [key(0)]) == [Tier.SSD]  # served from the staged copy meanwhile
    assert await read_bytes(s, 0) == data(0)  # promoted from the copy, not from disk
    assert s.lookup(NS, [key(0)]) == [Tier.CPU]
    e = s.cpu.get(key(0))
    assert e is not None and not e.on_ssd
    gate.set()
    await settle(s)
    info = s.describe(key(0))
    assert info is not None and info["tiers"] == ["cpu", "ssd"]
    assert s.cpu.get(key(0)) is e and clean(e)  # the write landed: now clean in memory
    await s.close(asyncio.get_running_loop().time() + 5)


@run_async
async def test_write_through_puts_every_commit_on_ssd(tmp_path: Path) -> None:
    s = Store(config(tmp_path, slots=4, write_through=True, persist_on_shutdown=False))
    await s.start()
    for i in range(3):
        put(s, i)
    await settle(s)
    st = s.snapshot()
    assert st.tiers["ssd"].chunks == 3 and st.tiers["cpu"].chunks == 3
    assert s.lookup(NS, [key(0)]) == [Tier.CPU]  # still served from memory
    for i in range(3, 10):  # evictions of chunks already on SSD cost no write
        put(s, i)
        await settle(s)
    st = s.snapshot()
    assert st.demotions_dropped == 0 and st.tiers["ssd"].chunks == 10
    assert await read_bytes(s, 0) == data(0)
    await s.close(asyncio.get_running_loop().time() + 5)


@run_async
async def test_write_through_with_a_full_write_queue_writes_every_commit_later(
    tmp_path: Path,
) -> None:
    """A burst of commits larger than the SSD's write queue: each commit that finds the
    queue full waits in the backlog and is written when a slot frees (before: it stayed
    in memory only, and an eviction burst later dropped it)."""

    def slow(op: str, path: str) -> None:
        if op == "write":
            time.sleep(0.01)

    cfg = config(tmp_path, slots=8, write_through=True, ssd_write_queue=1,
                 persist_on_shutdown=False)  # fmt: skip
    s = Store(cfg, ssd_fault_hook=slow)
    await s.start()
    for i in range(6):
        put(s, i)
    await settle(s)
    st = s.snapshot()
    assert st.tiers["ssd"].chunks == 6 and st.ssd_writes_refused == 0
    assert s._ssd_path is not None and s._ssd_path.backlog == 0
    for i in range(6, 14):  # every eviction now finds its victim on SSD: nothing dropped
        put(s, i)
    await settle(s)
    st = s.snapshot()
    assert st.demotions_dropped == 0
    assert all(s.lookup(NS, [key(i)]) != [None] for i in range(14))
    assert await read_bytes(s, 0) == data(0)
    await s.close(asyncio.get_running_loop().time() + 5)


@run_async
async def test_failed_start_leaves_no_arena(tmp_path: Path) -> None:
    first = Store(config(tmp_path))
    await first.start()
    second = Store(config(tmp_path))  # same SSD directory: refused
    mine = f"meshkv-{os.getpid()}-"
    before = {n for n in os.listdir(SHM_DIR) if n.startswith(mine)}
    with pytest.raises(ConfigError, match="in use by another meshkv agent"):
        await second.start()
    after = {n for n in os.listdir(SHM_DIR) if n.startswith(mine)}
    assert after == before  # the second arena was unlinked again
    assert first.arena_name in before  # (an arena another test leaked is not this one's)
    await first.close(asyncio.get_running_loop().time() + 2)


@run_async
async def test_promotion_waits_for_a_free_slot_until_its_deadline(tmp_path: Path) -> None:
    s = Store(config(tmp_path, slots=2, write_through=True))
    await s.start()
    loop = asyncio.get_running_loop()
    put(s, 1)
    await settle(s)
    # Every slot taken by writers' reservations (never evictable): chunk 1 is on SSD only.
    held: list[int] = []
    with pytest.raises(NoSpace):
        for i in range(10, 20):
            assert s.reserve(NS, key(i), SLOT, 2) is not None
            held.append(i)
    assert held and s.lookup(NS, [key(1)]) == [Tier.SSD]
    assert not await s.promote(NS, key(1))  # no deadline: gives up at once, counted
    assert s.snapshot().promotion_failures == 1
    waiting = asyncio.create_task(s.promote(NS, key(1), loop.time() + 5.0))
    await asyncio.sleep(0.1)
    assert not waiting.done()  # waiting for a slot, not failed
    s.abort(NS, key(held.pop()), 2)  # a writer gave its slot back
    assert await waiting
    assert s.lookup(NS, [key(1)]) == [Tier.CPU]
    assert await read_bytes(s, 1) == data(1)
    # A deadline that passes while no slot comes free: False, counted, nothing left held.
    s.reserve(NS, key(30), SLOT, 2)  # takes the slot chunk 1 sits in (evicted: on SSD)
    assert s.lookup(NS, [key(1)]) == [Tier.SSD]
    started = loop.time()
    assert not await s.promote(NS, key(1), loop.time() + 0.2)
    assert 0.15 <= loop.time() - started < 2.0
    assert s.snapshot().promotion_failures == 2
    for i in [*held, 30]:
        s.abort(NS, key(i), 2)
    await s.close(loop.time() + 2)
