"""Eviction policies over integer ids (slot ids): ``LRU`` and ``S3FIFO``.

Both are O(1) per operation and allocate nothing per operation: every queue is an
*intrusive* doubly-linked list kept in two preallocated integer arrays (``prev[i]`` and
``next[i]`` for id ``i``, plus one sentinel id that closes the ring), as in vLLM's
``FreeKVCacheBlockQueue``. Moving an id to the head or unlinking it rewrites four array
cells; no node objects exist.

A policy only orders ids; the CPU tier decides whether the id it proposes may go (a pinned
or in-flight slot may not). :meth:`victim` proposes without removing, :meth:`skip` moves a
proposal that cannot go out of the way, :meth:`remove` takes an id out (evicted, deleted or
pinned-and-dropped).

S3-FIFO (Yang et al., SOSP '23) is scan-resistant: new ids enter a small FIFO (~10 % of
the entries); ids that were read again before reaching its tail move to the main FIFO,
the rest leave at once and are remembered in a ghost FIFO of key fingerprints, so a key
that comes back soon after goes straight to the main FIFO. A scan of one-hit keys thus
churns only the small FIFO and never flushes the hot set, unlike LRU.
"""

from __future__ import annotations

from typing import Protocol

from meshkv.errors import ConfigError


class IntrusiveList:
    """Doubly-linked lists of ids ``0..capacity-1`` over shared ``prev``/``next`` arrays.

    Several lists may share one instance (each has its own sentinel); an id is on at most
    one list at a time. ``owner[i]`` is the list id holds, or -1.
    """

    __slots__ = ("capacity", "prev", "next", "owner", "lengths")

    def __init__(self, capacity: int, lists: int = 1) -> None:
        self.capacity = capacity
        total = capacity + lists  # ids, then one sentinel per list
        self.prev = [0] * total
        self.next = [0] * total
        self.owner = [-1] * capacity
        self.lengths = [0] * lists
        for li in range(lists):
            s = capacity + li
            self.prev[s] = s
            self.next[s] = s

    def __contains__(self, i: int) -> bool:
        return self.owner[i] >= 0

    def push_front(self, li: int, i: int) -> None:
        """Insert ``i`` (not on any list) at the head of list ``li``."""
        s = self.capacity + li
        first = self.next[s]
        self.prev[i] = s
        self.next[i] = first
        self.prev[first] = i
        self.next[s] = i
        self.owner[i] = li
        self.lengths[li] += 1

    def unlink(self, i: int) -> None:
        """Take ``i`` off whichever list holds it."""
        p, n = self.prev[i], self.next[i]
        self.next[p] = n
        self.prev[n] = p
        self.lengths[self.owner[i]] -= 1
        self.owner[i] = -1

    def move_front(self, li: int, i: int) -> None:
        self.unlink(i)
        self.push_front(li, i)

    def tail(self, li: int) -> int:
        """The oldest id of list ``li``, or -1 if it is empty."""
        s = self.capacity + li
        t = self.prev[s]
        return -1 if t == s else t

    def head(self, li: int) -> int:
        s = self.capacity + li
        h = self.next[s]
        return -1 if h == s else h


class EvictionPolicy(Protocol):
    def insert(self, i: int, fingerprint: int) -> None:
        """Track a newly committed id; ``fingerprint`` identifies its key (for ghosts)."""

    def touch(self, i: int) -> None:
        """Record a read hit."""

    def remove(self, i: int, evicted: bool) -> None:
        """Stop tracking ``i``; ``evicted`` when it leaves because of capacity pressure."""

    def victim(self) -> int:
        """The id to evict next (not removed), or -1 when nothing is tracked."""

    def skip(self, i: int) -> None:
        """``victim()`` proposed ``i`` but it cannot go now (pinned); move it aside."""

    def walk_length(self) -> int:
        """How many ``victim()``/``skip()`` rounds propose every tracked id at least once,
        whatever was read (the bound of a walk that looks for one that can go)."""

    def __len__(self) -> int: ...

    def __contains__(self, i: int) -> bool: ...


class LRU:
    """Least recently used: one list, head = most recent."""

    __slots__ = ("_l",)

    def __init__(self, capacity: int) -> None:
        self._l = IntrusiveList(capacity)

    def insert(self, i: int, fingerprint: int) -> None:
        self._l.push_front(0, i)

    def touch(self, i: int) -> None:
        if i in self._l:
            self._l.move_front(0, i)

    def remove(self, i: int, evicted: bool) -> None:
        if i in self._l:
            self._l.unlink(i)

    def victim(self) -> int:
        return self._l.tail(0)

    def skip(self, i: int) -> None:
        self._l.move_front(0, i)

    def walk_length(self) -> int:
        return self._l.lengths[0] + 1

    def __len__(self) -> int:
        return self._l.lengths[0]

    def __contains__(self, i: int) -> bool:
        return i in self._l


_SMALL, _MAIN = 0, 1
_MAX_FREQ = 3


class S3FIFO:
    """S3-FIFO with a small (probation) FIFO, a main FIFO and a ghost FIFO.

    ``small_ratio`` of the tracked entries may sit in the small FIFO before it is drained.
    Frequencies are 2-bit saturating counters (0..3) in a preallocated array. The ghost
    FIFO is a ring buffer of ``capacity`` fingerprints plus a count per fingerprint.
    """

    __slots__ = (
        "_l",
        "_freq",
        "_fp",
        "_small_ratio",
        "_ghost_ring",
        "_ghost_pos",
        "_ghost_count",
        "_skips",
    )

    def __init__(self, capacity: int, small_ratio: float = 0.1) -> None:
        if not 0.0 < small_ratio < 1.0:
            raise ConfigError(f"s3fifo small_ratio must be in (0, 1), got {small_ratio}")
        self._l = IntrusiveList(capacity, lists=2)
        self._freq = [0] * capacity
        self._fp = [0] * capacity
        self._small_ratio = small_ratio
        self._ghost_ring = [-1] * max(capacity, 1)
        self._ghost_pos = 0
        self._ghost_count: dict[int, int] = {}
        self._skips = 0
        """Proposals skipped (pinned) since the last insert or removal: once every main
        entry was, probation is looked at too (else its entries under their share of the
        queue would never be proposed while main is all pinned)."""

    def _ghost_add(self, fp: int) -> None:
        old = self._ghost_ring[self._ghost_pos]
        if old != -1:
            left = self._ghost_count[old] - 1
            if left:
                self._ghost_count[old] = left
            else:
                del self._ghost_count[old]
        self._ghost_ring[self._ghost_pos] = fp
        self._ghost_count[fp] = self._ghost_count.get(fp, 0) + 1
        self._ghost_pos = (self._ghost_pos + 1) % len(self._ghost_ring)

    def insert(self, i: int, fingerprint: int) -> None:
        self._skips = 0
        self._freq[i] = 0
        self._fp[i] = fingerprint
        # A ghost hit means the key was evicted from probation recently and is back: it
        # has shown reuse, so it skips probation.
        self._l.push_front(_MAIN if fingerprint in self._ghost_count else _SMALL, i)

    def touch(self, i: int) -> None:
        if self._freq[i] < _MAX_FREQ:
            self._freq[i] += 1

    def remove(self, i: int, evicted: bool) -> None:
        owner = self._l.owner[i]
        if owner < 0:
            return
        self._skips = 0
        if evicted and owner == _SMALL:
            self._ghost_add(self._fp[i])
        self._l.unlink(i)

    def victim(self) -> int:
        lengths = self._l.lengths
        # Each pass moves one id between or within the FIFOs and lowers a frequency or
        # empties probation, so the loop ends within O(entries * _MAX_FREQ) steps in the
        # worst case and O(1) amortized.
        while lengths[_SMALL] or lengths[_MAIN]:
            small_over = lengths[_SMALL] > self._small_ratio * (lengths[_SMALL] + lengths[_MAIN])
            main_pinned = self._skips >= lengths[_MAIN]
            if lengths[_SMALL] and (small_over or main_pinned):
                t = self._l.tail(_SMALL)
                if self._freq[t] > 0:
                    # Read again while on probation: promote, forget the probation hits.
                    self._freq[t] = 0
                    self._l.move_front(_MAIN, t)
                    continue
                return t
            t = self._l.tail(_MAIN)
            if self._freq[t] > 0:
                self._freq[t] -= 1
                self._l.move_front(_MAIN, t)
                continue
            return t
        return -1

    def skip(self, i: int) -> None:
        self._skips += 1
        self._l.move_front(_MAIN, i)

    def walk_length(self) -> int:
        # A main entry read f times is passed over f times (one lower each time) before it
        # is proposed, and those passes cost no proposal; between two of its passes every
        # other main entry comes up once, and probation gives each of its entries up once.
        n = self._l.lengths[_SMALL] + self._l.lengths[_MAIN]
        return (_MAX_FREQ + 2) * n + 1

    def __len__(self) -> int:
        return self._l.lengths[_SMALL] + self._l.lengths[_MAIN]

    def __contains__(self, i: int) -> bool:
        return i in self._l


def make_policy(name: str, capacity: int) -> LRU | S3FIFO:
    """Build the policy called ``name`` (``lru`` or ``s3fifo``) over ``capacity`` ids."""
    if name == "lru":
        return LRU(capacity)
    if name == "s3fifo":
        return S3FIFO(capacity)
    raise ConfigError(f"unknown eviction policy {name!r} (choose 'lru' or 's3fifo')")
