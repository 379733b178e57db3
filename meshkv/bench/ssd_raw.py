"""Raw disk baseline for the SSD-tier benchmark: plain ``os.pwrite``/``os.pread`` GB/s.

What is measured, per chunk size, in the directory the SSD tier will use: write
``count`` files of that size, one file per chunk like the tier (``os.open`` +
``os.pwrite`` + ``os.fsync`` + ``os.close``, no temp file, no rename, no header, no
checksum), then read each back with ``os.preadv`` into one preallocated buffer. Writes go
through the page cache, or with ``direct`` by ``O_DIRECT`` from page-aligned memory (the
tier's default write path; sizes must then be multiples of 4 KiB). Files are removed after
each call, so buffered writes here reuse the page-cache pages of the last call's files,
which the tier (whose files stay) cannot: the buffered baseline is the harder one. With
``drop_cache`` each file's clean pages are dropped (``POSIX_FADV_DONTNEED``) after its
fsync, so reads come from the device and not from memory. The tier's write path adds a
header, a temp file and a rename; its read path adds a header read and an xxh3 check. The
SSD-tier benchmark should report its GB/s as a ratio of these numbers, measured in the
same run (the machine is noisy).

``workers`` threads share the files (file ``i`` goes to thread ``i % workers``), as the
tier's pool of ``ssd.workers`` threads does: both sides keep the same number of requests
in flight on the device, so neither is faster for a reason the other could also use.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

BLOCK = 4096


@dataclass(frozen=True, slots=True)
class RawResult:
    """Raw throughput of one chunk size."""

    size: int
    """Bytes per file."""
    count: int
    """Files written and read."""
    write_gbps: float
    """GB/s (1e9 bytes) of pwrite + fsync + close, open included."""
    read_gbps: float
    """GB/s of open + pread + close."""
    workers: int = 1
    """Threads that shared the files."""
    direct: bool = False
    """Written with O_DIRECT."""


def drop_file_cache(path: str) -> None:
    """Ask the kernel to drop the clean cached pages of ``path`` (best effort)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _write_file(path: str, data: memoryview, fsync: bool, direct: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], done)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(path: str, view: memoryview) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], done)
            if n == 0:
                raise OSError(f"{path} shrank while being read")
            done += n
    finally:
        os.close(fd)


def _timed(pool: ThreadPoolExecutor | None, jobs: list[Callable[[], None]]) -> float:
    t0 = time.perf_counter()
    if pool is None:
        for job in jobs:
            job()
    else:
        for future in [pool.submit(job) for job in jobs]:
            future.result()
    return time.perf_counter() - t0


def measure_raw(
    directory: str,
    sizes: Sequence[int],
    count: int = 8,
    *,
    fsync: bool = True,
    drop_cache: bool = True,
    workers: int = 1,
    direct: bool = False,
) -> list[RawResult]:
    """Measure plain pwrite/pread GB/s of files of each size in ``directory``, with
    ``workers`` threads (writes by O_DIRECT with ``direct``).

    The files are removed afterwards. ``count`` files of each size are written, then read.
    """
    if count <= 0 or not sizes or min(sizes) <= 0 or workers <= 0:
        raise ValueError("count, workers and every size must be positive")
    if direct and any(size % BLOCK for size in sizes):
        raise ValueError(f"O_DIRECT writes need sizes in multiples of {BLOCK} bytes")
    os.makedirs(directory, exist_ok=True)
    tag = secrets.token_hex(4)
    results: list[RawResult] = []
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        for size in sizes:
            block = os.urandom(1 << 16)
            source = mmap.mmap(-1, size)  # page-aligned, as an arena slot
            source[:] = (block * (size // len(block) + 1))[:size]
            data = memoryview(source)
            paths = [os.path.join(directory, f".raw-{tag}-{size}-{i}") for i in range(count)]
            try:
                write_s = _timed(
                    pool, [partial(_write_file, p, data, fsync, direct) for p in paths]
                )
                if drop_cache:
                    for path in paths:
                        drop_file_cache(path)
                # One buffer per file, allocated and touched before the clock, as the tier
                # reads each chunk into its own (mapped) arena slot.
                views = [memoryview(bytearray(size)) for _ in paths]
                read_s = _timed(
                    pool, [partial(_read_file, p, v) for p, v in zip(paths, views, strict=True)]
                )
            finally:
                for path in paths:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            total = size * count
            results.append(
                RawResult(size, count, total / write_s / 1e9, total / read_s / 1e9, workers, direct)
            )
    finally:
        if pool is not None:
            pool.shutdown()
    return results
