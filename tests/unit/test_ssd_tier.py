"""SSD tier: atomic files, verification on read, start-up scan, cap, degrade on ENOSPC."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from meshkv.chunk import ChunkKey, NamespaceId, payload_checksum
from meshkv.errors import ConfigError
from meshkv.tiers.ssd import BLOCK, SsdTier, SsdTierConfig, file_bytes, payload_span

NS = NamespaceId(b"n" * 16)
SIZE = 64 << 10
FILE = file_bytes(SIZE, aligned=True)


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body in a fresh event loop (no pytest-asyncio needed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "big"))


def payload(i: int, size: int = SIZE) -> bytes:
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


def make(path: Path, cap: int = 100 * FILE, **kw: object) -> SsdTier:
    return SsdTier(SsdTierConfig(str(path), cap, fsync=False), **kw)  # type: ignore[arg-type]


async def put(t: SsdTier, i: int, size: int = SIZE) -> bool:
    data = payload(i, size)
    if not t.admit(key(i), size):
        return False
    return await t.write(NS, key(i), 16, payload_checksum(data), memoryview(data))


async def get(t: SsdTier, i: int, size: int = SIZE) -> bytes | None:
    buf = bytearray(size)
    return bytes(buf) if await t.read_into(NS, key(i), memoryview(buf)) is not None else None


def degraded(t: SsdTier) -> bool:
    return t.degraded


async def started(path: Path, cap: int = 100 * FILE, **kw: object) -> SsdTier:
    t = make(path, cap, **kw)
    await t.start()
    return t


@run_async
async def test_write_read_roundtrip_and_restart(tmp_path: Path) -> None:
    t = await started(tmp_path)
    for i in range(5):
        assert await put(t, i)
    assert await get(t, 3) == payload(3)
    assert t.used_bytes == 5 * FILE
    t.close()
    t2 = await started(tmp_path)
    assert len(t2) == 5 and t2.used_bytes == 5 * FILE
    for i in range(5):
        assert await get(t2, i) == payload(i)
    t2.close()


@run_async
async def test_chunk_and_lock_files_are_private_to_the_agent(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask would leave 0644 files readable by everyone
    try:
        t = await started(tmp_path)
        assert await put(t, 1)
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert len(files) >= 2  # the chunk and the directory lock
        assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o600)}
        t.close()
    finally:
        os.umask(old)


@run_async
async def test_flipped_byte_detected_removed_counted(tmp_path: Path) -> None:
    t = await started(tmp_path)
    await put(t, 1)
    path = t.path(key(1))
    at = payload_span(path)[0] + 1000
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))
    assert await get(t, 1) is None
    assert t.counters.checksum_failures == 1
    assert key(1) not in t and t.used_bytes == 0
    await asyncio.sleep(0.05)  # the unlink runs in the pool
    assert not os.path.exists(path)
    assert await get(t, 1) is None  # never served again
    t.close()


@run_async
async def test_truncated_file_is_a_counted_miss(tmp_path: Path) -> None:
    t = await started(tmp_path)
    await put(t, 1)
    await put(t, 2)
    os.truncate(t.path(key(1)), FILE - 100)
    assert await get(t, 1) is None
    assert t.counters.checksum_failures == 1 and key(1) not in t
    # the same damage found at start-up is removed by the scan
    os.truncate(t.path(key(2)), FILE - 100)
    t.close()
    t2 = await started(tmp_path)
    assert len(t2) == 0 and t2.counters.corrupt_removed == 1 and t2.used_bytes == 0
    t2.close()


@run_async
async def test_partial_temp_files_removed_at_start(tmp_path: Path) -> None:
    t = await started(tmp_path)
    await put(t, 1)
    t.close()
    tmp = Path(t.path(key(2))).with_suffix(".abcd1234.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"half a chunk")
    t2 = await started(tmp_path)
    assert not tmp.exists() and t2.counters.partial_removed == 1
    assert len(t2) == 1 and await get(t2, 1) == payload(1)
    t2.close()


@run_async
async def test_cap_never_exceeded_and_shrinks_on_restart(tmp_path: Path) -> None:
    t = await started(tmp_path, cap=4 * FILE + 10)
    for i in range(10):
        assert await put(t, i)
        assert t.used_bytes <= 4 * FILE + 10
        on_disk = sum(f.stat().st_size for f in tmp_path.rglob("*.mkv"))
        assert on_disk <= 4 * FILE + 10
    assert sorted(int.from_bytes(k, "big") for k in t.chunk_keys()) == [6, 7, 8, 9]
    assert t.counters.evictions["capacity"] == 6
    t.close()
    t2 = await started(tmp_path, cap=2 * FILE)
    assert t2.used_bytes == 2 * FILE and len(t2) == 2
    assert sum(f.stat().st_size for f in tmp_path.rglob("*.mkv")) == 2 * FILE
    t2.close()


@run_async
async def test_injected_enospc_degrades_then_recovers(tmp_path: Path) -> None:
    fail = {"on": True}

    def hook(op: str, path: str) -> None:
        if op == "write" and fail["on"]:
            raise OSError(errno.ENOSPC, "No space left on device", path)

    now = [0.0]
    t = make(tmp_path, fault_hook=hook, clock=lambda: now[0])
    await t.start()
    assert not await put(t, 1)
    assert t.degraded and t.counters.write_errors == 1 and t.used_bytes == 0
    assert not t.admit(key(2), SIZE)  # backing off
    assert t.counters.writes_refused == 1
    fail["on"] = False
    now[0] += 1.5
    assert await put(t, 2)  # the probe write succeeds
    assert t.counters.write_errors == 1
    assert not degraded(t), "a successful probe write clears the degraded flag"
    assert await get(t, 2) == payload(2)
    assert list(tmp_path.rglob("*.tmp")) == []
    t.close()


@run_async
async def test_real_enospc_on_tiny_tmpfs(tmp_path: Path) -> None:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        t = await started(mnt, cap=100 << 20)  # the cap is larger than the disk
        results = [await put(t, i, 256 << 10) for i in range(6)]
        assert results[0] and not all(results)
        assert t.degraded and t.counters.write_errors >= 1
        assert t.used_bytes == sum(f.stat().st_size for f in mnt.rglob("*.mkv"))
        assert list(mnt.rglob("*.tmp")) == []
        assert await get(t, 0, 256 << 10) == payload(0, 256 << 10)
        t.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@run_async
async def test_crash_mid_write_leaves_only_complete_chunks(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import asyncio, mmap
        from meshkv.chunk import payload_checksum
        from meshkv.tiers.ssd import SsdTier, SsdTierConfig
        async def main():
            t = SsdTier(SsdTierConfig({str(tmp_path)!r}, 1 << 40, fsync=False))
            await t.start()
            i = 0
            while True:
                data = mmap.mmap(-1, 1 << 20)  # page-aligned: written with O_DIRECT
                data[:] = bytes([i % 251]) * (1 << 20)
                k = i.to_bytes(16, "big")
                assert t.admit(k, len(data))
                await t.write(b"n" * 16, k, 16, payload_checksum(data), memoryview(data))
                print(i, flush=True)
                i += 1
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    written = 0
    while written < 20 and time.monotonic() < deadline:
        written = int(proc.stdout.readline()) + 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    assert written >= 20
    t = await started(tmp_path, cap=1 << 40)
    assert len(t) >= written  # every acknowledged chunk survived
    for k in t.chunk_keys():
        i = int.from_bytes(k, "big")
        buf = bytearray(1 << 20)
        assert await t.read_into(NS, k, memoryview(buf)) is not None
        assert buf == bytes([i % 251]) * (1 << 20)
    assert list(tmp_path.rglob("*.tmp")) == []
    t.close()


def aligned_payload(i: int, size: int) -> mmap.mmap:
    """``payload(i, size)`` in page-aligned memory, as an arena slot holds it."""
    buf = mmap.mmap(-1, size)
    buf[:] = payload(i, size)
    return buf


@pytest.mark.parametrize("size", [SIZE, SIZE + 100, 100])
@run_async
async def test_an_aligned_payload_is_written_with_o_direct(tmp_path: Path, size: int) -> None:
    t = await started(tmp_path)
    data = aligned_payload(7, size)
    assert t.admit(key(7), size)
    assert await t.write(NS, key(7), 16, payload_checksum(data), memoryview(data))
    assert t.counters.direct_writes == 1
    path = t.path(key(7))
    # header block, the payload, zeros to the end of its last block
    assert os.path.getsize(path) == file_bytes(size, aligned=True) == t.used_bytes
    assert os.path.getsize(path) % BLOCK == 0
    assert payload_span(path) == (BLOCK, size)
    raw = Path(path).read_bytes()
    assert raw[BLOCK : BLOCK + size] == payload(7, size)
    assert raw[BLOCK + size :] == bytes(len(raw) - BLOCK - size)
    assert await get(t, 7, size) == payload(7, size)
    t.close()
    t2 = await started(tmp_path)  # the scan accepts the aligned layout
    assert len(t2) == 1 and t2.used_bytes == file_bytes(size, aligned=True)
    assert await get(t2, 7, size) == payload(7, size)
    t2.close()


@run_async
async def test_an_aligned_slot_reads_by_o_direct_and_damage_is_still_caught(
    tmp_path: Path,
) -> None:
    t = await started(tmp_path)
    size = SIZE + 100  # whole blocks by O_DIRECT, the last 100 bytes through the page cache
    for i in range(3):
        data = aligned_payload(i, size)
        assert t.admit(key(i), size)
        assert await t.write(NS, key(i), 16, payload_checksum(data), memoryview(data))
    dest = mmap.mmap(-1, size)  # page-aligned, as an arena slot
    assert await t.read_into(NS, key(0), memoryview(dest)) is not None
    assert dest[:] == payload(0, size) and t.counters.direct_reads == 1
    offset, _ = payload_span(t.path(key(1)))
    with open(t.path(key(1)), "r+b") as f:  # one flipped byte inside the direct-read blocks
        f.seek(offset + 5000)
        b = f.read(1)
        f.seek(offset + 5000)
        f.write(bytes([b[0] ^ 0x10]))
    assert await t.read_into(NS, key(1), memoryview(dest)) is None
    assert t.counters.checksum_failures == 1 and key(1) not in t
    os.truncate(t.path(key(2)), offset + 3 * BLOCK + 17)  # cut inside the direct-read blocks
    assert await t.read_into(NS, key(2), memoryview(dest)) is None
    assert t.counters.checksum_failures == 2 and key(2) not in t
    assert t.counters.direct_reads == 1  # only the good read counts
    t.close()


@run_async
async def test_an_unaligned_payload_is_written_through_the_page_cache(tmp_path: Path) -> None:
    t = await started(tmp_path)
    data = aligned_payload(3, SIZE + 1)
    view = memoryview(data)[1:]  # one byte off a page boundary
    assert t.admit(key(3), SIZE)
    assert await t.write(NS, key(3), 16, payload_checksum(view), view)
    assert t.counters.direct_writes == 0
    assert os.path.getsize(t.path(key(3))) == FILE
    assert await get(t, 3) == bytes(view)
    del view
    t.close()


@run_async
async def test_compact_files_of_older_releases_are_still_read(tmp_path: Path) -> None:
    old = SsdTier(SsdTierConfig(str(tmp_path), 100 * FILE, fsync=False, direct_io=False))
    await old.start()
    for i in range(3):
        assert await put(old, i)
    assert old.counters.direct_writes == 0
    assert os.path.getsize(old.path(key(1))) == file_bytes(SIZE, aligned=False)
    assert payload_span(old.path(key(1))) == (file_bytes(0, aligned=False), SIZE)
    old.close()
    t = await started(tmp_path)  # direct_io on (the default)
    assert len(t) == 3 and t.used_bytes == 3 * file_bytes(SIZE, aligned=False)
    for i in range(3):
        assert await get(t, i) == payload(i)
    assert await put(t, 5)  # new files in the aligned layout beside them
    assert t.used_bytes == 3 * file_bytes(SIZE, aligned=False) + FILE
    t.close()


@run_async
async def test_a_filesystem_that_refuses_o_direct_gets_page_cache_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Fake: every filesystem on this kernel (ext4, tmpfs) accepts O_DIRECT; some FUSE
    # filesystems and older tmpfs refuse it at open with EINVAL, as this stand-in does.
    real_open = os.open

    def refusing_open(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, mode)

    # Other tests of the session may leave the root logger above WARNING: ask for it here.
    caplog.set_level(logging.WARNING, logger="meshkv.tiers.ssd")
    t = await started(tmp_path)
    monkeypatch.setattr(os, "open", refusing_open)
    for i in range(2):
        data = aligned_payload(i, SIZE)
        assert t.admit(key(i), SIZE)
        assert await t.write(NS, key(i), 16, payload_checksum(data), memoryview(data))
    monkeypatch.undo()
    assert t.counters.direct_writes == 0 and t.counters.write_errors == 0
    assert not t.degraded and t.used_bytes == 2 * FILE
    assert await get(t, 0) == payload(0) and await get(t, 1) == payload(1)
    assert sum("O_DIRECT" in r.getMessage() for r in caplog.records) == 1  # said once
    t.close()


@run_async
async def test_reads_stop_trying_o_direct_once_the_filesystem_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = await started(tmp_path)
    for i in range(2):
        data = aligned_payload(i, SIZE)
        assert t.admit(key(i), SIZE)
        assert await t.write(NS, key(i), 16, payload_checksum(data), memoryview(data))
    real_open, tries = os.open, []

    def refusing_open(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:  # fake, as in the write test above
            tries.append(path)
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", refusing_open)
    dest = mmap.mmap(-1, SIZE)
    for i in range(2):
        assert await t.read_into(NS, key(i), memoryview(dest)) is not None
        assert dest[:] == payload(i)
    monkeypatch.undo()
    assert len(tries) == 1 and t.counters.direct_reads == 0
    t.close()


@run_async
async def test_two_tiers_cannot_share_a_directory(tmp_path: Path) -> None:
    t = await started(tmp_path)
    other = make(tmp_path)
    with pytest.raises(ConfigError, match="in use by another meshkv agent"):
        await other.start()
    other.close()
    t.close()
    again = await started(tmp_path)  # released on close
    again.close()


@run_async
async def test_a_directory_the_tier_cannot_use_is_refused_with_the_reason(tmp_path: Path) -> None:
    """A file where a fan-out directory goes, or a directory nobody may create files in
    (``/proc``, refused even to root): a ConfigError naming the directory, the reason and
    the path that failed, not an OSError traceback out of the agent's start."""
    (tmp_path / "00").write_bytes(b"not a directory")
    t = make(tmp_path)
    refused = r"SSD directory .* cannot be used: File exists \(.*/00\)"
    with pytest.raises(ConfigError, match=refused):
        await t.start()
    t.close()
    assert (tmp_path / "00").read_bytes() == b"not a directory"  # nothing of the user's touched
    proc = make(Path("/proc"))
    with pytest.raises(ConfigError, match=r"SSD directory /proc cannot be used: .*\.meshkv\.lock"):
        await proc.start()
    proc.close()


@run_async
async def test_odd_entries_under_chunk_names_never_stop_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO under a chunk file's name used to hang the agent's start (a blocking open), a
    directory under one stopped it; a read error on one file (a bad sector: simulated, the
    only fake here, as no failing disk exists on this machine) did too. Each is now one
    damaged file: counted, removed where it can be, never indexed; the good chunks stay."""
    t = await started(tmp_path)
    for i in range(3):
        assert await put(t, i)
    t.close()
    good = {p.name: p for p in tmp_path.rglob("*.mkv")}
    assert len(good) == 3
    fan_out = tmp_path / "00"
    fifo = fan_out / (key(100).hex() + ".mkv")
    os.mkfifo(fifo)
    odd_dir = fan_out / (key(101).hex() + ".mkv")
    odd_dir.mkdir()
    bad_sector = sorted(good.values())[0]
    real_pread = os.pread

    def failing_pread(fd: int, n: int, offset: int) -> bytes:
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(bad_sector):
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", failing_pread)
    again = make(tmp_path)
    await asyncio.wait_for(again.start(), 10)  # before: blocked for good in open(fifo)
    monkeypatch.undo()
    assert again.counters.corrupt_removed == 3
    assert not fifo.exists() and not bad_sector.exists()
    assert odd_dir.is_dir()  # cannot be unlinked: left, logged, never indexed
    for i in range(3):
        data = await get(again, i)
        assert data is None if key(i).hex() + ".mkv" == bad_sector.name else data == payload(i)
    again.close()
