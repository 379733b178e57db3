"""glibc's heap numbers (``meshkv.heap``) as ``/v1/status`` reports them: they follow real
allocations, and they are there on this machine (glibc) rather than silently absent."""

from __future__ import annotations

import asyncio
import platform
from typing import Any

import pytest

from meshkv import heap
from meshkv.server.http import process_stats

GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallinfo2 is glibc's")
def test_malloc_numbers_follow_native_allocations() -> None:
    before = heap.malloc_stats()
    # bytes objects over 512 bytes bypass Python's small-object allocator: glibc's malloc
    held = [bytes(4000) for _ in range(5000)]
    during = heap.malloc_stats()
    assert during["malloc_in_use_bytes"] - before["malloc_in_use_bytes"] >= 5000 * 4000
    del held
    after = heap.malloc_stats()
    assert during["malloc_in_use_bytes"] - after["malloc_in_use_bytes"] >= 5000 * 4000
    # freed, it is glibc's (kept free in its arenas, or given back), never in use
    assert after["malloc_free_bytes"] >= 0
    assert after["malloc_arena_bytes"] <= during["malloc_arena_bytes"]


def test_the_status_document_says_what_the_heap_holds() -> None:
    async def in_the_loop() -> dict[str, Any]:  # as /v1/status calls it
        return process_stats()

    stats = asyncio.run(in_the_loop())
    assert stats["python_blocks"] > 0
    assert stats["gc_full_collections"] >= 0 and stats["gc_collected_objects"] >= 0
    if GLIBC:  # this machine, and every Linux host we ship to: the numbers must be there
        assert stats["malloc_in_use_bytes"] > 0 and "malloc_free_bytes" in stats
