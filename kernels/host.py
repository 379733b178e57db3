"""The CPU fast path: the reference's per-run copies, done as single-threaded memcpy.

The same runs as ``reference.py``, executed by ``numpy.copyto`` on zero-copy numpy views
of the (integer-typed) torch tensors. Why not torch itself: a torch ``copy_`` of a few MiB
forks and joins its OpenMP pool on every call, and on a 2-core machine where any other
process holds a core (the agent hashing a chunk, another engine) each join waits for a
time slice. Measured here under load, per-chunk torch copies ran at 1-3 GB/s while the
same copies through numpy ran at 15-18 GB/s, as fast as a contiguous memcpy
(docs/kernels.md has the numbers). numpy releases the GIL while it copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .reference import block_runs

#: A group of layers as a numpy view: ``(first_layer, (Lg, P, N, piece) array)``.
HostGroup = tuple[int, "np.ndarray[Any, Any]"]


def gather(
    groups: Sequence[HostGroup], block_ids: Sequence[int], out: np.ndarray[Any, Any]
) -> None:
    """Copy blocks ``block_ids`` of every layer into ``out`` ``(L, nb, P, piece)``."""
    runs = block_runs(block_ids)
    for first, view in groups:
        dst = out[first : first + view.shape[0]]
        for block, pos, n in runs:
            np.copyto(dst[:, pos : pos + n], view[:, :, block : block + n].transpose(0, 2, 1, 3))


def scatter(
    src: np.ndarray[Any, Any],
    groups: Sequence[HostGroup],
    block_ids: Sequence[int],
    positions: Sequence[int] | None = None,
) -> None:
    """Copy ``src`` ``(L, nb, P, piece)`` into blocks ``block_ids`` of every layer."""
    runs = block_runs(block_ids, positions)
    for first, view in groups:
        part = src[first : first + view.shape[0]]
        for block, pos, n in runs:
            np.copyto(view[:, :, block : block + n], part[:, pos : pos + n].transpose(0, 2, 1, 3))
