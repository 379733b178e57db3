"""Raw disk baseline for the SSD-tier benchmark: plain ``os.pwrite``/``os.pread`` GB/s.

What is measured, per chunk size, in the directory the SSD tier will use: write
``count`` files of that size, one file per chunk like the tier (``os.open`` +
``os.pwrite`` + ``os.fsync`` + ``os.close``, no temp file, no rename, no header, no
checksum), then read each back with ``os.preadv`` into one preallocated buffer. O_DIRECT is
not used (the tier does not use it either), so both sides go through the page cache; with
``drop_cache`` each file's clean pages are dropped (``POSIX_FADV_DONTNEED``) after its
fsync, so reads come from the device and not from memory. The tier's write path adds a
header, a temp file and a rename; its read path adds a header read and an xxh3 check. The
SSD-tier benchmark should report its GB/s as a ratio of these numbers, measured in the
same run (the machine is noisy).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass


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


def drop_file_cache(path: str) -> None:
    """Ask the kernel to drop the clean cached pages of ``path`` (best effort)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_raw(
    directory: str,
    sizes: Sequence[int],
    count: int = 8,
    *,
    fsync: bool = True,
    drop_cache: bool = True,
) -> list[RawResult]:
    """Measure plain pwrite/pread GB/s of files of each size in ``directory``.

    The files are removed afterwards. ``count`` files of each size are written, then read.
    """
    if count <= 0 or not sizes or min(sizes) <= 0:
        raise ValueError("count and every size must be positive")
    os.makedirs(directory, exist_ok=True)
    tag = secrets.token_hex(4)
    results: list[RawResult] = []
    for size in sizes:
        block = os.urandom(1 << 16)
        data = memoryview((block * (size // len(block) + 1))[:size])
        paths = [os.path.join(directory, f".raw-{tag}-{size}-{i}") for i in range(count)]
        try:
            t0 = time.perf_counter()
            for path in paths:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    done = 0
                    while done < size:
                        done += os.pwrite(fd, data[done:], done)
                    if fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            write_s = time.perf_counter() - t0
            if drop_cache:
                for path in paths:
                    drop_file_cache(path)
            buf = bytearray(size)
            view = memoryview(buf)
            t0 = time.perf_counter()
            for path in paths:
                fd = os.open(path, os.O_RDONLY)
                try:
                    done = 0
                    while done < size:
                        n = os.preadv(fd, [view[done:]], done)
                        if n == 0:
                            raise OSError(f"{path} shrank while being read")
                        done += n
                finally:
                    os.close(fd)
            read_s = time.perf_counter() - t0
        finally:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        total = size * count
        results.append(RawResult(size, count, total / write_s / 1e9, total / read_s / 1e9))
    return results
