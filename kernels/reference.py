"""Pure-torch gather/scatter: the CPU path and the reference the Triton kernels match.

Both directions work on normalized views built and checked by ``ops.KVCaches``:

* the cache side is a list of *layer groups*, each ``(first_layer, view)`` with ``view``
  of shape ``(layers_in_group, planes, num_blocks, piece)`` in the integer word type.
  When an engine allocated all layers in one buffer at a uniform stride (vLLM's CPU
  backend does), one group covers every layer and a chunk moves in one torch call;
* the chunk side is ``(num_layers, num_chunk_blocks, planes, piece)``, contiguous.

Block ids are split into runs of consecutive ids. A run is one ``copy_`` of a strided
slice, with no index tensor and no temporary; engines hand out consecutive blocks most of
the time. Gathers with many runs use ``index_select(..., out=)`` into the payload view
instead; scatters always copy per run because ``index_copy_`` measured several times
slower than per-run copies on the CPU (see docs/kernels.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: A group of layers stored at a uniform stride: ``(first_layer, (Lg, P, N, piece) view)``.
LayerGroup = tuple[int, torch.Tensor]

#: Above this many runs a gather uses one ``index_select`` per group instead of per-run
#: copies (fewer Python-level calls; the same bytes either way).
GATHER_INDEX_SELECT_MIN_RUNS = 3


def block_runs(
    block_ids: Sequence[int], positions: Sequence[int] | None = None
) -> list[tuple[int, int, int]]:
    """Split ids into runs: ``(first_id, first_position_in_chunk, length)``.

    ``positions[k]`` is where block ``block_ids[k]`` sits in the chunk (default ``k``); a
    run continues while both the id and the position go up by one.
    """
    pos_of = range(len(block_ids)) if positions is None else positions
    runs: list[tuple[int, int, int]] = []
    start = first = count = 0
    prev_b = prev_p = -2
    for b, p in zip(block_ids, pos_of, strict=True):
        if count and b == prev_b + 1 and p == prev_p + 1:
            count += 1
        else:
            if count:
                runs.append((start, first, count))
            start, first, count = b, p, 1
        prev_b, prev_p = b, p
    if count:
        runs.append((start, first, count))
    return runs


def gather(groups: Sequence[LayerGroup], block_ids: Sequence[int], out: torch.Tensor) -> None:
    """Copy blocks ``block_ids`` of every layer into ``out`` ``(L, nb, P, piece)``."""
    runs = block_runs(block_ids)
    if len(runs) >= GATHER_INDEX_SELECT_MIN_RUNS:
        index = torch.tensor(block_ids, dtype=torch.int64, device=out.device)
        for first, view in groups:
            dst = out[first : first + view.shape[0]].transpose(1, 2)
            torch.index_select(view, 2, index, out=dst)
        return
    for first, view in groups:
        dst = out[first : first + view.shape[0]]
        for block, pos, n in runs:
            dst[:, pos : pos + n].copy_(view[:, :, block : block + n].transpose(1, 2))


def scatter(
    src: torch.Tensor,
    groups: Sequence[LayerGroup],
    block_ids: Sequence[int],
    positions: Sequence[int] | None = None,
) -> None:
    """Copy ``src`` ``(L, nb, P, piece)`` into blocks ``block_ids`` of every layer.

    With ``positions``, chunk block ``positions[k]`` goes to ``block_ids[k]`` (a partial
    load: the engine already holds the other blocks of the chunk)."""
    runs = block_runs(block_ids, positions)
    for first, view in groups:
        part = src[first : first + view.shape[0]]
        for block, pos, n in runs:
            view[:, :, block : block + n].copy_(part[:, pos : pos + n].transpose(1, 2))
