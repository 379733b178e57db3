"""The SSD tier: one directory of chunk files with byte-accurate capacity accounting.

Each chunk is one file ``<dir>/<kk>/<key hex>.mkv`` (``kk`` = first key byte, 256 fan-out
directories keep directories small): ``RecordHeader.pack()`` zero-padded to a 4 KiB block,
then the payload, zero-padded to a whole 4 KiB block (the header's ``FLAG_ALIGNED``; files
of releases before it, without the flag, have the payload right after the 68-byte header
and no padding, and are still read). The aligned layout lets the tier write with
``O_DIRECT`` straight from the arena slot (``direct_io``, on by default): no copy into the
page cache. That copy was the write path's cost here, not the disk: buffered writes of
files that stay (a cache keeps its files) need fresh page-cache pages for every byte and
ran at ~0.3-0.6 GB/s with or without fsync, O_DIRECT writes at 1.2-1.6 GB/s on the same
disk. Reads bring the payload's whole blocks back the same way, straight into the slot.
Where the filesystem refuses ``O_DIRECT`` (or a buffer is not 4 KiB-aligned) the same
layout goes through the page cache. A
file is written to ``<key hex>.<random>.tmp`` in the same directory, fsynced (unless
``fsync=False``) and renamed into place, so a crash leaves either a complete file or a
temp file, never a partial ``.mkv``. The start-up scan removes temp files and files whose
header is damaged or whose size disagrees with the header, and rebuilds the index from the
rest (oldest modification time = least recently used). The payload checksum is verified
on every read; a file that fails is removed, counted, and never served.

Usage is the sum of file sizes (header, payload and padding) of indexed files plus the bytes of
admitted writes, and never exceeds ``capacity_bytes``: a write is admitted only after
least-recently-used files have been evicted to fit, and evicted files are unlinked before
the new file is written.

Disk I/O runs in a bounded thread pool (``workers``); at most ``write_queue_depth``
writes are admitted at once (a demotion beyond that is refused and the caller drops it,
counted). An ``OSError`` on write (ENOSPC, EIO) marks the tier degraded: logged once,
writes refused until a backoff expires, then one probe write is let through; success
clears the flag. The CPU tier keeps the chunk when its write fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import secrets
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from meshkv.chunk import (
    KEY_BYTES,
    RECORD_HEADER_BYTES,
    ChunkKey,
    NamespaceId,
    RecordHeader,
)
from meshkv.errors import ChecksumMismatch, ConfigError, NamespaceMismatch

log = logging.getLogger(__name__)

SUFFIX = ".mkv"
TMP_SUFFIX = ".tmp"
LOCK_NAME = ".meshkv.lock"

BLOCK = 4096
"""Alignment of the aligned layout: O_DIRECT needs buffer addresses, file offsets and
lengths in multiples of the device's logical block (512 B or 4 KiB); 4 KiB covers both."""
FLAG_ALIGNED = 1
"""``RecordHeader.flags`` bit of a chunk file in the aligned layout (payload at ``BLOCK``)."""

FaultHook = Callable[[str, str], None]
"""``hook(op, path)`` runs in the I/O thread before each ``write``/``read``; tests raise
``OSError`` from it to inject faults."""


@dataclass(slots=True)
class SsdTierConfig:
    """Configuration of the on-disk tier."""

    directory: str
    """Directory of chunk files (created if missing); one agent per directory."""
    capacity_bytes: int = 64 << 30
    """Cap on the bytes of chunk files (headers included)."""
    workers: int = 2
    """Threads doing disk I/O."""
    write_queue_depth: int = 8
    """Writes admitted at once; a demotion beyond this is dropped (counted)."""
    fsync: bool = True
    """fsync each file before the rename that publishes it (crash-safe contents)."""
    direct_io: bool = True
    """Write chunk files with O_DIRECT in the 4 KiB-aligned layout (no page-cache copy);
    False writes the compact layout through the page cache (smallest files)."""
    retry_initial_s: float = 1.0
    """First back-off after a failed write before a probe write is tried."""
    retry_max_s: float = 60.0
    """Largest back-off between probe writes while degraded."""

    def __post_init__(self) -> None:
        if not self.directory:
            raise ConfigError("ssd.directory must be set")
        if self.capacity_bytes <= 0:
            raise ConfigError(f"ssd.capacity_bytes must be positive, got {self.capacity_bytes}")
        if self.workers <= 0 or self.write_queue_depth <= 0:
            raise ConfigError("ssd.workers and ssd.write_queue_depth must be positive")
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            raise ConfigError("ssd retry back-off must satisfy 0 < retry_initial_s <= retry_max_s")


@dataclass(slots=True)
class SsdEntry:
    ns: NamespaceId
    num_tokens: int
    payload_len: int
    checksum: int
    aligned: bool = False
    """The file is in the aligned layout (``FLAG_ALIGNED``)."""

    @property
    def file_bytes(self) -> int:
        return file_bytes(self.payload_len, self.aligned)


def file_bytes(payload_len: int, aligned: bool) -> int:
    """Size of the chunk file of a ``payload_len``-byte payload in either layout."""
    if not aligned:
        return RECORD_HEADER_BYTES + payload_len
    return BLOCK + -(-payload_len // BLOCK) * BLOCK


def _layout(header: RecordHeader) -> tuple[bool, int]:
    """(aligned layout?, payload offset) of the chunk file with ``header``."""
    aligned = bool(header.flags & FLAG_ALIGNED)
    return aligned, BLOCK if aligned else RECORD_HEADER_BYTES


def payload_span(path: str) -> tuple[int, int]:
    """(offset, length) of the payload in the chunk file ``path`` (read from its header)."""
    with open(path, "rb") as f:
        header = RecordHeader.unpack(f.read(RECORD_HEADER_BYTES))
    return _layout(header)[1], header.payload_len


@dataclass(slots=True)
class SsdCounters:
    """Monotonic counters of the SSD tier."""

    hits: int = 0
    misses: int = 0
    namespace_mismatches: int = 0
    stored_bytes: int = 0
    loaded_bytes: int = 0
    evictions: dict[str, int] = field(default_factory=dict)
    """By reason: ``capacity``, ``checksum``, ``clear``."""
    checksum_failures: int = 0
    partial_removed: int = 0
    """Temp files (interrupted writes) removed by the start-up scan."""
    corrupt_removed: int = 0
    """Files with a damaged header or wrong size removed by the start-up scan."""
    write_errors: int = 0
    read_errors: int = 0
    writes_refused: int = 0
    """Writes not admitted: queue full, degraded, or no room."""
    direct_writes: int = 0
    """Files written with O_DIRECT (the rest went through the page cache)."""
    direct_reads: int = 0
    """Reads whose whole payload blocks came by O_DIRECT straight into the slot."""


class SsdTier:
    """Index of chunk files plus the thread pool that reads and writes them."""

    def __init__(
        self,
        config: SsdTierConfig,
        *,
        fault_hook: FaultHook | None = None,
        on_drop: Callable[[ChunkKey], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_drop(key)`` is told when a chunk leaves this tier."""
        self.config = config
        self.fault_hook = fault_hook
        self.on_drop = on_drop
        self.clock = clock
        self.counters = SsdCounters()
        self.used_bytes = 0
        self.degraded = False
        self._index: OrderedDict[ChunkKey, SsdEntry] = OrderedDict()  # oldest first
        self._writing: set[ChunkKey] = set()
        self._cancelled: set[ChunkKey] = set()  # cleared while being written
        self._victims: dict[ChunkKey, list[str]] = {}  # files to unlink before the write
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="meshkv-ssd")
        self._read_slots = asyncio.Semaphore(4 * config.workers)
        self._retry_at = 0.0
        self._backoff = config.retry_initial_s
        self._probing = False
        self._lock_fd = -1
        self._direct = config.direct_io  # cleared for good if the filesystem refuses it

    # ------------------------------------------------------------------ start / stop

    async def start(self) -> None:
        """Create the directory and rebuild the index from the files in it."""
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._pool, self._scan)
        for key, entry in found:
            self._index[key] = entry
            self.used_bytes += entry.file_bytes
        over = []
        while self.used_bytes > self.config.capacity_bytes and self._index:
            over.append(self._evict_oldest())
        if over:
            log.info("ssd cap shrank: evicted %d files to fit", len(over))
            await loop.run_in_executor(self._pool, _unlink_all, over)
        log.info(
            "ssd tier %s: %d chunks, %d bytes (%d partial and %d corrupt files removed)",
            self.config.directory,
            len(self._index),
            self.used_bytes,
            self.counters.partial_removed,
            self.counters.corrupt_removed,
        )

    def _scan(self) -> list[tuple[ChunkKey, SsdEntry]]:
        root = self.config.directory
        try:
            os.makedirs(root, exist_ok=True)
            self._lock_dir(root)
            for b in range(256):  # all fan-out directories up front: no mkdir on the write path
                os.makedirs(os.path.join(root, f"{b:02x}"), exist_ok=True)
            return self._scan_files(root)
        except OSError as exc:  # read-only, not ours, a file where a fan-out directory goes
            where = f" ({exc.filename})" if exc.filename else ""
            raise ConfigError(
                f"SSD directory {root} cannot be used: {exc.strerror or exc}{where}; give "
                "--ssd-dir a directory of its own that this agent's user can write"
            ) from exc

    def _scan_files(self, root: str) -> list[tuple[ChunkKey, SsdEntry]]:
        found: list[tuple[int, ChunkKey, SsdEntry]] = []
        for sub in sorted(os.listdir(root)):
            subdir = os.path.join(root, sub)
            if len(sub) != 2 or not os.path.isdir(subdir):
                continue
            for name in os.listdir(subdir):
                path = os.path.join(subdir, name)
                if name.endswith(TMP_SUFFIX):
                    _unlink(path)
                    self.counters.partial_removed += 1
                    continue
                if not name.endswith(SUFFIX):
                    continue
                checked = _check_file(path, name[: -len(SUFFIX)])
                if checked is None:
                    log.warning("removing damaged chunk file %s", path)
                    try:
                        _unlink(path)
                    except OSError as exc:  # a directory under a chunk's name, EIO, EROFS
                        log.warning("cannot remove %s (%s); it is left and never served",
                                    path, exc.strerror or exc)  # fmt: skip
                    self.counters.corrupt_removed += 1
                    continue
                found.append(checked)
        found.sort(key=lambda t: t[0])
        return [(k, e) for _, k, e in found]

    def _lock_dir(self, root: str) -> None:
        # Two agents sharing a directory would each evict the other's files and break the
        # cap; an flock held for the tier's life (dropped by the kernel on death) forbids it.
        fd = os.open(os.path.join(root, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"SSD directory {root} is in use by another meshkv agent; give each agent "
                "its own directory"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # ------------------------------------------------------------------ index

    @property
    def capacity_bytes(self) -> int:
        return self.config.capacity_bytes

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: ChunkKey) -> bool:
        return key in self._index

    @property
    def writes_in_flight(self) -> int:
        return len(self._writing)

    def is_writing(self, key: ChunkKey) -> bool:
        return key in self._writing

    def chunk_keys(self) -> list[ChunkKey]:
        return list(self._index)

    def get(self, key: ChunkKey) -> SsdEntry | None:
        return self._index.get(key)

    def find(self, ns: NamespaceId, key: ChunkKey, *, check_ns: bool = True) -> SsdEntry | None:
        e = self._index.get(key)
        if e is None:
            return None
        if check_ns and e.ns != ns:
            self.counters.namespace_mismatches += 1
            return None
        return e

    def path(self, key: ChunkKey) -> str:
        h = key.hex()
        return os.path.join(self.config.directory, h[:2], h + SUFFIX)

    def remove(self, key: ChunkKey, reason: str) -> None:
        """Forget ``key`` and delete its file (in the pool)."""
        entry = self._index.pop(key, None)
        if entry is None:
            return
        self.used_bytes -= entry.file_bytes
        self._count_eviction(reason)
        self._account_removed(key)
        self._pool.submit(_unlink, self.path(key))

    def clear(self) -> int:
        self._cancelled.update(self._writing)
        keys = list(self._index)
        for key in keys:
            self.remove(key, "clear")
        return len(keys)

    def _account_removed(self, key: ChunkKey) -> None:
        # called after the entry left the index
        if self.on_drop is not None:
            self.on_drop(key)

    def _count_eviction(self, reason: str) -> None:
        ev = self.counters.evictions
        ev[reason] = ev.get(reason, 0) + 1

    def _evict_oldest(self) -> str:
        key, entry = self._index.popitem(last=False)
        self.used_bytes -= entry.file_bytes
        self._count_eviction("capacity")
        self._account_removed(key)
        return self.path(key)

    # ------------------------------------------------------------------ writes

    def admit(self, key: ChunkKey, payload_len: int) -> bool:
        """Reserve room for a write of ``key`` now; False if it must be dropped.

        On True the caller must call :meth:`write` (which releases the admission).
        """
        need = file_bytes(payload_len, self.config.direct_io)
        if key in self._index or key in self._writing:
            return False
        if len(self._writing) >= self.config.write_queue_depth or need > self.capacity_bytes:
            self.counters.writes_refused += 1
            return False
        if self.degraded:
            if self._probing or self.clock() < self._retry_at:
                self.counters.writes_refused += 1
                return False
            self._probing = True
        victims: list[str] = []
        while self.used_bytes + need > self.capacity_bytes and self._index:
            victims.append(self._evict_oldest())
        if self.used_bytes + need > self.capacity_bytes:
            # everything left is in-flight writes
            self.counters.writes_refused += 1
            if self.degraded:
                self._probing = False
            if victims:
                self._pool.submit(_unlink_all, victims)
            return False
        self.used_bytes += need
        self._writing.add(key)
        if victims:
            self._victims[key] = victims
        return True

    async def write(
        self,
        ns: NamespaceId,
        key: ChunkKey,
        num_tokens: int,
        checksum: int,
        payload: memoryview,
    ) -> bool:
        """Write an admitted chunk; True once it is on disk and indexed.

        ``payload`` must stay valid until this returns (the caller holds the slot).
        """
        aligned = self.config.direct_io
        header = RecordHeader(
            ns, key, num_tokens, len(payload), checksum, FLAG_ALIGNED if aligned else 0
        )
        entry = SsdEntry(ns, num_tokens, len(payload), checksum, aligned)
        victims = self._victims.pop(key, [])
        loop = asyncio.get_running_loop()
        try:
            direct = await loop.run_in_executor(
                self._pool,
                self._write_file,
                self.path(key),
                header.pack(),
                payload,
                victims,
            )
        except OSError as exc:
            self._cancelled.discard(key)
            self.used_bytes -= entry.file_bytes
            self.counters.write_errors += 1
            self._degrade(exc)
            return False
        finally:
            self._writing.discard(key)
        if key in self._cancelled:
            self._cancelled.discard(key)
            self.used_bytes -= entry.file_bytes
            self._pool.submit(_unlink, self.path(key))
            return False
        if self.degraded:
            self.degraded = False
            self._probing = False
            self._backoff = self.config.retry_initial_s
            log.warning("ssd tier %s recovered: writes resumed", self.config.directory)
        self._index[key] = entry
        self.counters.stored_bytes += entry.file_bytes
        self.counters.direct_writes += direct
        return True

    def _degrade(self, exc: OSError) -> None:
        self._probing = False
        self._retry_at = self.clock() + self._backoff
        if not self.degraded:
            self.degraded = True
            log.error(
                "ssd tier %s degraded after a write error (%s); writes paused, retry in %.1f s",
                self.config.directory,
                exc,
                self._backoff,
            )
        self._backoff = min(self._backoff * 2, self.config.retry_max_s)

    def _write_file(
        self, path: str, header: bytes, payload: memoryview, victims: list[str]
    ) -> bool:
        """Write and publish one chunk file (in the pool); True if it went by O_DIRECT."""
        _unlink_all(victims)
        tmp = f"{path[: -len(SUFFIX)]}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        if self.fault_hook is not None:
            self.fault_hook("write", tmp)
        aligned = self.config.direct_io
        direct = self._direct and _block_aligned(payload)
        try:
            fd, direct = self._open_tmp(tmp, direct)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, direct = self._open_tmp(tmp, direct)
        try:
            try:
                if not aligned:
                    _pwritev_all(fd, [memoryview(header), payload])
                    direct = False
                else:
                    direct = self._write_aligned(fd, header, payload, direct)
                if self.config.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        return direct

    def _open_tmp(self, tmp: str, direct: bool) -> tuple[int, bool]:
        """(fd, whether it has O_DIRECT) of a new temp file."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        if direct:
            try:
                return os.open(tmp, flags | os.O_DIRECT, 0o600), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._no_direct(exc)
        return os.open(tmp, flags, 0o600), False

    def _no_direct(self, exc: OSError) -> None:
        """The filesystem refused O_DIRECT: this and every later file go through the
        page cache (same layout)."""
        if self._direct:
            self._direct = False
            log.warning(
                "ssd tier %s: the filesystem refused O_DIRECT (%s); reads and writes go "
                "through the page cache",
                self.config.directory,
                exc,
            )

    def _write_aligned(self, fd: int, header: bytes, payload: memoryview, direct: bool) -> bool:
        """Header block, the payload's whole blocks straight from ``payload``, its last
        partial block from a bounce page; O_DIRECT when ``fd`` has it (True if it did)."""
        body = len(payload) - len(payload) % BLOCK
        tail = len(payload) - body
        # Page-aligned and zeroed; freed with its last view (not closed here: a failed
        # write's traceback may still hold views of it).
        bounce = mmap.mmap(-1, 2 * BLOCK if tail else BLOCK)
        bounce[: len(header)] = header
        if tail:
            bounce[BLOCK : BLOCK + tail] = payload[body:]
        pages = memoryview(bounce)
        iov = [pages[:BLOCK]]
        if body:
            iov.append(payload[:body])
        if tail:
            iov.append(pages[BLOCK:])
        try:
            _pwritev_all(fd, iov)
        except OSError as exc:
            if not direct or exc.errno != errno.EINVAL:
                raise
            # Taken at open but refused at the write (some filesystems do that).
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self._no_direct(exc)
            _pwritev_all(fd, iov)
            return False
        return direct

    # ------------------------------------------------------------------ reads

    async def read_into(
        self, ns: NamespaceId | None, key: ChunkKey, dest: memoryview
    ) -> SsdEntry | None:
        """Read and verify ``key``'s payload into ``dest`` (exactly its length).

        Returns the entry, or None if the file is gone, unreadable or damaged (a damaged
        file is removed and counted).
        """
        entry = self._index.get(key)
        if entry is None:
            self.counters.misses += 1
            return None
        if len(dest) != entry.payload_len:
            raise ValueError(
                f"destination of {len(dest)} bytes for a {entry.payload_len}-byte chunk"
            )
        loop = asyncio.get_running_loop()
        async with self._read_slots:
            try:
                direct = await loop.run_in_executor(
                    self._pool, self._read_file, self.path(key), ns, key, dest
                )
            except (ChecksumMismatch, NamespaceMismatch) as exc:
                log.warning("ssd chunk %s failed verification (%s); removed", key.hex(), exc)
                self.counters.checksum_failures += 1
                self.counters.misses += 1
                if self._index.get(key) is entry:
                    self.remove(key, "checksum")
                return None
            except FileNotFoundError:
                self.counters.misses += 1
                if self._index.pop(key, None) is entry:
                    self.used_bytes -= entry.file_bytes
                    self._account_removed(key)
                return None
            except OSError as exc:
                log.warning("ssd read of %s failed: %s", key.hex(), exc)
                self.counters.read_errors += 1
                self.counters.misses += 1
                return None
        if key in self._index:
            self._index.move_to_end(key)
        self.counters.hits += 1
        self.counters.loaded_bytes += entry.file_bytes
        self.counters.direct_reads += direct
        return entry

    def _read_file(
        self, path: str, ns: NamespaceId | None, key: ChunkKey, dest: memoryview
    ) -> bool:
        """Read and verify one chunk file into ``dest`` (in the pool); True if its whole
        blocks came by O_DIRECT."""
        if self.fault_hook is not None:
            self.fault_hook("read", path)
        fd = os.open(path, os.O_RDONLY)
        try:
            header = RecordHeader.unpack(os.pread(fd, RECORD_HEADER_BYTES, 0))
            if header.key != key or header.payload_len != len(dest):
                raise ChecksumMismatch("record header does not match the index")
            aligned, offset = _layout(header)
            got = 0
            body = len(dest) - len(dest) % BLOCK
            if aligned and body and self._direct and _block_aligned(dest):
                got = self._read_direct(path, dest, body)
            direct = got > 0
            while got < len(dest):
                n = os.preadv(fd, [dest[got:]], offset + got)
                if n == 0:
                    raise ChecksumMismatch(f"chunk file truncated: {got} of {len(dest)} bytes")
                got += n
            if os.fstat(fd).st_size != file_bytes(len(dest), aligned):
                raise ChecksumMismatch("chunk file has the wrong size for its header")
        finally:
            os.close(fd)
        header.verify(dest, ns)
        return direct

    def _read_direct(self, path: str, dest: memoryview, body: int) -> int:
        """Read the payload's first ``body`` bytes (whole blocks) into ``dest`` by O_DIRECT;
        the bytes read, a multiple of ``BLOCK`` (0 where the filesystem refuses, which stops
        the tier trying: the caller reads them through the page cache; short at a
        truncated file: the caller finds it)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._no_direct(exc)
            return 0
        try:
            got = 0
            while got < body:
                n = os.preadv(fd, [dest[got:body]], BLOCK + got)
                if n <= 0:
                    break
                got += n
            return got - got % BLOCK
        finally:
            os.close(fd)


def _pwritev_all(fd: int, iov: list[memoryview]) -> None:
    """Write ``iov`` at offset 0 of ``fd``, going on after short writes."""
    offset = 0
    while iov:
        done = os.pwritev(fd, iov, offset)
        if done <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += done
        while iov and done >= len(iov[0]):
            done -= len(iov[0])
            iov = iov[1:]
        if done:
            iov = [iov[0][done:], *iov[1:]]


def _block_aligned(buf: memoryview) -> bool:
    """Whether ``buf`` starts on a ``BLOCK`` boundary (O_DIRECT reads from it directly)."""
    if len(buf) < BLOCK:
        return True  # only the bounce pages are written
    try:
        ref = ctypes.c_char.from_buffer(buf)
    except TypeError:  # read-only: its address is not reachable from here
        return False
    address = ctypes.addressof(ref)
    del ref
    return address % BLOCK == 0


def _check_file(path: str, stem: str) -> tuple[int, ChunkKey, SsdEntry] | None:
    """(mtime, key, entry) of a complete chunk file, or None if it is damaged."""
    try:
        key = ChunkKey(bytes.fromhex(stem))
    except ValueError:
        return None
    if len(key) != KEY_BYTES:
        return None
    try:
        # O_NONBLOCK: a FIFO under a chunk's name must not hang the scan (it is no file of
        # ours); a read error (a bad sector) makes this one file damaged, not the tier.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        raw = os.pread(fd, RECORD_HEADER_BYTES, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        header = RecordHeader.unpack(raw)
    except ChecksumMismatch:
        return None
    aligned = _layout(header)[0]
    if header.key != key or st.st_size != file_bytes(header.payload_len, aligned):
        return None
    entry = SsdEntry(
        header.namespace, header.num_tokens, header.payload_len, header.checksum, aligned
    )
    return st.st_mtime_ns, key, entry


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _unlink_all(paths: list[str]) -> None:
    for p in paths:
        _unlink(p)
