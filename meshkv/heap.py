"""What the C allocator holds: glibc's ``mallinfo2`` through ctypes.

An agent's anonymous memory is Python's object arenas (pymalloc, mapped directly), glibc's
heap (buffers, C extensions, the hash and SSD threads' per-thread arenas) and thread
stacks. When the resident number climbs and Python's traced heap does not, these numbers
say which part: ``in_use`` rising is a native leak; ``free`` rising is memory glibc keeps
after it was freed (fragmentation, or arenas of threads that allocated and freed in
bursts). Where the C library is not glibc (musl, macOS), everything here is absent rather
than wrong.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any


class _MallInfo2(ctypes.Structure):
    # glibc >= 2.33, malloc.h: ten size_t fields in this order
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # bytes obtained from the system with brk/sbrk, all arenas
            "ordblks",  # free chunks
            "smblks",  # free fastbin chunks
            "hblks",  # mmapped regions
            "hblkhd",  # bytes in mmapped regions
            "usmblks",  # unused
            "fsmblks",  # bytes in freed fastbin chunks
            "uordblks",  # bytes in use, not counting mmapped regions
            "fordblks",  # bytes free inside the arenas
            "keepcost",  # releasable at the top of the main heap
        )
    ]


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc older than 2.33
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return libc


_LIBC = _libc()


def malloc_stats() -> dict[str, int]:
    """``{}`` where glibc's numbers are not available. ``malloc_in_use_bytes`` counts live
    allocations (large ones, which glibc maps on their own, included); ``malloc_free_bytes``
    what glibc holds freed inside its arenas; ``malloc_arena_bytes`` the arenas' size (main
    heap and per-thread); ``malloc_mmapped_bytes`` the large allocations alone."""
    if _LIBC is None:
        return {}
    info = _LIBC.mallinfo2()
    return {
        "malloc_in_use_bytes": int(info.uordblks + info.hblkhd),
        "malloc_free_bytes": int(info.fordblks),
        "malloc_arena_bytes": int(info.arena),
        "malloc_mmapped_bytes": int(info.hblkhd),
    }
