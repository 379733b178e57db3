"""Slot allocator: size classes carved out of fixed-size arena segments.

The arena is cut into equal *segments* (``segment_bytes``, default 64 MiB). A segment
that is free belongs to no class; the first time a class needs room it takes a free
segment and carves it into ``segment_bytes // class_size`` slots. When the last slot of a
segment is freed, the whole segment goes back to the free pool and may be carved for
another class. So one agent serves 2, 16 and 32 MiB chunks side by side (benchmarks and
tests do), while a deployment with one chunk size ends up with every segment in one class.

Size classes: four per power of two, ``2^k * {1, 1.25, 1.5, 1.75}`` from ``min_slot_bytes``
up to ``segment_bytes`` (the jemalloc spacing). Why not powers of two: a model whose
chunk is 1.5 or 1.75 × a power of two (e.g. 28 layers, 12 KV heads) would waste a third
to a half of the arena. Why not one exact class per chunk size: tails of partial chunks
(P/D) have arbitrary sizes and would each create a class. With this spacing at most 20 %
of a slot is padding, and the common power-of-two and x.25/x.5/x.75 sizes fit exactly.

A chunk whose class has no free slot when no segment is free takes a free slot of a larger
class (``alloc_larger``) before anything is evicted for it: the connector's partial chunks
(P/D tails, ``block_hits`` cuts) in an arena carved for whole chunks then cost one evicted
chunk each, not a whole segment emptied for their class — for chunks at least half the
size of the slot they borrow (a smaller one would hold on to a mostly empty slot; it waits
for a segment of its own class).

Everything is O(1) and allocation-free per operation: a segment's free slots are a stack
in one preallocated flat array plus a bump pointer for never-used slots (carving is O(1)),
and the segments of a class that still have a free slot are an intrusive list.
"""

from __future__ import annotations

import bisect

from meshkv.errors import ConfigError
from meshkv.tiers.eviction import IntrusiveList

MIN_CLASS_BYTES = 16 * 1024
"""Smallest allowed ``min_slot_bytes``: keeps every class a multiple of 4 KiB (pages)."""


def size_classes(min_slot_bytes: int, max_slot_bytes: int) -> list[int]:
    """Class sizes ``2^k * (4 + i) / 4`` in ``[min_slot_bytes, max_slot_bytes]``."""
    sizes: list[int] = []
    base = min_slot_bytes
    while base <= max_slot_bytes:
        for i in range(4):
            size = base * (4 + i) // 4
            if size <= max_slot_bytes:
                sizes.append(size)
        base *= 2
    return sizes


class SlotAllocator:
    """Hands out slot ids; a slot id names one ``class size`` byte range of the arena."""

    __slots__ = (
        "segment_bytes",
        "num_segments",
        "per_segment",
        "classes",
        "free_bytes",
        "_seg_class",
        "_seg_used",
        "_seg_bump",
        "_seg_nslots",
        "_seg_top",
        "_stack",
        "_lists",
        "_free_list",
    )

    def __init__(self, arena_bytes: int, segment_bytes: int, min_slot_bytes: int) -> None:
        for name, value in (("segment_bytes", segment_bytes), ("min_slot_bytes", min_slot_bytes)):
            if value < MIN_CLASS_BYTES or value & (value - 1):
                raise ConfigError(
                    f"{name} must be a power of two >= {MIN_CLASS_BYTES}, got {value}"
                )
        if min_slot_bytes > segment_bytes:
            raise ConfigError(
                f"min_slot_bytes ({min_slot_bytes}) exceeds segment_bytes ({segment_bytes})"
            )
        if arena_bytes < segment_bytes:
            raise ConfigError(
                f"the arena ({arena_bytes} bytes) is smaller than one segment ({segment_bytes})"
            )
        self.segment_bytes = segment_bytes
        self.num_segments = arena_bytes // segment_bytes
        self.per_segment = segment_bytes // min_slot_bytes
        self.classes = size_classes(min_slot_bytes, segment_bytes)
        self.free_bytes = self.num_segments * segment_bytes
        n = self.num_segments
        self._seg_class = [-1] * n
        self._seg_used = [0] * n
        self._seg_bump = [0] * n
        self._seg_nslots = [0] * n
        self._seg_top = [0] * n
        self._stack = [0] * (n * self.per_segment)
        # one list per class ("has a free slot") plus the free-segment list
        self._lists = IntrusiveList(n, lists=len(self.classes) + 1)
        self._free_list = len(self.classes)
        for s in range(n - 1, -1, -1):
            self._lists.push_front(self._free_list, s)

    @property
    def capacity_bytes(self) -> int:
        return self.num_segments * self.segment_bytes

    @property
    def max_slot_bytes(self) -> int:
        return self.classes[-1]

    @property
    def num_ids(self) -> int:
        """Slot ids range over ``[0, num_ids)`` (not all exist at once)."""
        return self.num_segments * self.per_segment

    def class_of(self, size: int) -> int:
        """Index of the smallest class that holds ``size`` bytes."""
        if size <= 0:
            raise ValueError(f"chunk size must be positive, got {size}")
        c = bisect.bisect_left(self.classes, size)
        if c == len(self.classes):
            raise ValueError(
                f"chunk of {size} bytes exceeds the largest slot ({self.classes[-1]} bytes); "
                "raise cpu.segment_bytes"
            )
        return c

    def alloc(self, c: int) -> int:
        """A free slot id of class ``c``, or -1 if neither the class nor the pool has room."""
        lists = self._lists
        s = lists.head(c)
        if s < 0:
            s = lists.tail(self._free_list)
            if s < 0:
                return -1
            size = self.classes[c]
            nslots = self.segment_bytes // size
            lists.unlink(s)
            lists.push_front(c, s)
            self._seg_class[s] = c
            self._seg_nslots[s] = nslots
            self._seg_bump[s] = 0
            self._seg_top[s] = 0
            self.free_bytes -= self.segment_bytes - nslots * size  # tail padding
        base = s * self.per_segment
        top = self._seg_top[s]
        if top:
            top -= 1
            self._seg_top[s] = top
            j = self._stack[base + top]
        else:
            j = self._seg_bump[s]
            self._seg_bump[s] = j + 1
        used = self._seg_used[s] + 1
        self._seg_used[s] = used
        if used == self._seg_nslots[s]:
            lists.unlink(s)
        self.free_bytes -= self.classes[c]
        return base + j

    def alloc_larger(self, c: int, size: int) -> int:
        """A free slot of the smallest class above ``c`` that has one and is at most twice
        ``size``, or -1. For when ``alloc(c)`` failed (no slot of class ``c`` and no free
        segment): a chunk then takes a roomier slot instead of evicting others, or instead
        of waiting until a whole segment empties for its own class, which in an arena
        carved for one chunk size may take evicting much of it (the connector's partial
        chunks are smaller than its whole ones). At most twice: a small class would
        otherwise live in large slots for good (eight 16 KiB chunks holding an arena of
        128 KiB slots). Walks the classes: only on this slow path."""
        head, classes = self._lists.head, self.classes
        for k in range(c + 1, len(classes)):
            if classes[k] > 2 * size:
                break
            if head(k) >= 0:
                return self.alloc(k)
        return -1

    def free(self, slot: int) -> None:
        s, j = divmod(slot, self.per_segment)
        c = self._seg_class[s]
        if c < 0:
            raise ValueError(f"slot {slot} is not allocated")
        size = self.classes[c]
        nslots = self._seg_nslots[s]
        used = self._seg_used[s] - 1
        self._seg_used[s] = used
        self.free_bytes += size
        lists = self._lists
        if used == 0:
            # The segment is empty: give it back to the pool for any class.
            if lists.owner[s] >= 0:
                lists.unlink(s)
            self._seg_class[s] = -1
            self.free_bytes += self.segment_bytes - nslots * size
            lists.push_front(self._free_list, s)
            return
        base = s * self.per_segment
        self._stack[base + self._seg_top[s]] = j
        self._seg_top[s] += 1
        if used == nslots - 1:
            lists.push_front(c, s)

    def offset(self, slot: int) -> int:
        s, j = divmod(slot, self.per_segment)
        return s * self.segment_bytes + j * self.classes[self._seg_class[s]]

    def slot_bytes(self, slot: int) -> int:
        """The class size of an allocated slot."""
        return self.classes[self._seg_class[slot // self.per_segment]]

    def free_segments(self) -> int:
        return self._lists.lengths[self._free_list]
