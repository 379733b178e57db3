"""The shared-memory arena: the bytes of the CPU tier, mapped by the agent and its engines.

The arena is one file in ``/dev/shm`` mapped with ``mmap``. We use the ``os`` level rather
than ``multiprocessing.shared_memory`` because the latter registers every segment with
``resource_tracker``, which warns about (and may unlink) segments that another process
created or still uses.

Names are ``meshkv-<pid>-<starttime>-<random>``: unique per agent instance (two agents on
one host, or two arenas in one test process, never collide) and self-describing, so that
an agent starting after a crash can find arenas whose owner is gone and unlink them
(:func:`reclaim_stale`). The process start time (``/proc/<pid>/stat`` field 22) guards
against a recycled pid keeping a dead agent's arena alive forever.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import stat

import numpy as np

from meshkv.errors import ConfigError, NoSpace

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
ARENA_PREFIX = "meshkv-"
_NAME_RE = re.compile(r"^meshkv-(\d+)-(\d+)-([0-9a-f]{8,32})$")
PAGE_BYTES = mmap.PAGESIZE


def _start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses; fields after the last
    # ')' are fixed. starttime is field 22, i.e. index 19 after the ')'.
    rest = raw[raw.rindex(b")") + 2 :].split()
    return int(rest[19])


def new_arena_name() -> str:
    """A fresh, host-unique arena name that encodes the owner (this process)."""
    pid = os.getpid()
    return f"{ARENA_PREFIX}{pid}-{_start_ticks(pid) or 0}-{secrets.token_hex(8)}"


def owner_alive(name: str) -> bool:
    """True if the process that created arena ``name`` still runs (unparseable → True)."""
    m = _NAME_RE.match(name)
    if m is None:
        return True
    pid, ticks = int(m.group(1)), int(m.group(2))
    current = _start_ticks(pid)
    return current is not None and (ticks == 0 or current == ticks)


class Arena:
    """A named shared-memory region mapped read-write into this process."""

    __slots__ = ("name", "size", "_mm", "_view", "_owner", "_path", "_lock_fd")

    def __init__(
        self, name: str, size: int, mm: mmap.mmap, owner: bool, path: str, lock_fd: int = -1
    ) -> None:
        self.name = name
        self.size = size
        self._mm = mm
        self._view: memoryview | None = memoryview(mm)
        self._owner = owner
        self._path = path
        self._lock_fd = lock_fd

    @classmethod
    def create(cls, size: int, *, prefault: bool = True, shm_dir: str = SHM_DIR) -> Arena:
        """Create a new arena of ``size`` bytes (a multiple of the page size).

        The tmpfs pages are allocated up front (``posix_fallocate``), so a too-small
        ``/dev/shm`` fails here with a clear error instead of SIGBUS on first touch, and
        with ``prefault`` every page is written once so the first copies run at memcpy
        speed rather than page-fault speed (FACTS.md: 3.6 vs 20-45 GB/s).
        """
        if size <= 0 or size % PAGE_BYTES:
            raise ConfigError(f"arena size must be a positive multiple of {PAGE_BYTES}: {size}")
        name = new_arena_name()
        path = os.path.join(shm_dir, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # The owner holds an exclusive flock for its whole life; the kernel drops it when
            # the process dies, however it dies, which is what reclaim_stale() tests.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.ENOMEM):
                    raise
                raise NoSpace(
                    f"cannot allocate a {size}-byte arena in {shm_dir}: {exc.strerror}"
                ) from exc
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if prefault else 0)
            mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)
            raise
        arena = cls(name, size, mm, True, path, lock_fd=fd)
        if prefault:
            arena.prefault()
        log.info("created arena %s (%d bytes)", name, size)
        return arena

    @classmethod
    def attach(cls, name: str, *, shm_dir: str = SHM_DIR) -> Arena:
        """Map an existing arena by name, read-write (what engine processes do)."""
        if "/" in name or not name.startswith(ARENA_PREFIX):
            raise ConfigError(f"not a meshkv arena name: {name!r}")
        path = os.path.join(shm_dir, name)
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(name, size, mm, False, path)

    def prefault(self) -> None:
        """Write one byte in every page so that the kernel maps them all now."""
        pages = np.frombuffer(self.buffer, dtype=np.uint8)[::PAGE_BYTES]
        pages[:] = 0

    @property
    def buffer(self) -> memoryview:
        if self._view is None:
            raise ValueError(f"arena {self.name} is closed")
        return self._view

    def view(self, offset: int, length: int) -> memoryview:
        """Writable view of ``[offset, offset + length)``."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range [{offset}, {offset + length}) outside arena of {self.size}")
        return self.buffer[offset : offset + length]

    def close(self) -> None:
        """Unmap; the owner also unlinks. Views handed out must be released first."""
        if self._view is None:
            return
        self._view.release()
        self._view = None
        try:
            self._mm.close()
        except BufferError:
            log.warning("arena %s still has exported views; leaving the mapping open", self.name)
        if self._owner:
            self.unlink()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reclaim_stale(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink arenas whose owning agent is dead; returns the names removed.

    An arena is stale only when both checks agree: the pid in its name is gone (or now
    names a process with another start time), and nobody holds the owner's flock on it.
    The lock protects live agents in other pid namespaces that share ``/dev/shm``; the pid
    check protects an arena in the instant between its creation and its lock.
    """
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        return removed
    for name in names:
        if _NAME_RE.match(name) is None or owner_alive(name):
            continue
        path = os.path.join(shm_dir, name)
        try:
            # /dev/shm is writable by every user: only a regular file of this agent's own
            # user is an arena it may reclaim; O_NONBLOCK, so that a FIFO under an arena's
            # name cannot hang the start.
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            os.unlink(path)
            removed.append(name)
            log.warning("reclaimed stale arena %s of a dead agent", name)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
    return removed
