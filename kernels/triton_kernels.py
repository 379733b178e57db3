"""Triton gather/scatter of engine blocks by block-id table, for GPUs.

One program moves one tile of one plane of one block of one layer: the grid is
``(jobs, num_layers * planes, tiles_per_piece)`` where a *job* is one block of one chunk.
All chunks of a batch go in one launch, which is what makes a request's worth of chunks
cheap to move; a launch may also cover a range of layers only (layered loads: one launch
per layer, the same job table).

Addresses are element offsets from two base tensors: per-layer offsets from layer 0's
tensor (layers may be separate allocations), per-chunk offsets from the first buffer.
Under the Triton interpreter (CPU tensors) the same source runs unchanged, which is how
the tests check it against the torch reference on a machine without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

#: Words per program, largest first: 256 (2 KiB with 8-byte words) with one warp was the
#: best launch shape of all swept on an H200 (2-4% over 1024 words with 4 warps, for
#: FlashAttention and MLA pieces, both directions; ``benchmarks.kernel_tiles``).
TILES = (256, 128)
#: Words each thread moves (8 x 8 B: 64 B in flight per thread, whatever the tile).
WORDS_PER_THREAD = 8


# Triton resolves a kernel's annotations in this module's globals and accepts only
# ``tl.constexpr`` there, so the pointer and size parameters carry none (hence the ignore).
def _copy_blocks(  # type: ignore[no-untyped-def]
    cache_ptr,
    buf_ptr,
    layer_table_ptr,
    jobs_ptr,
    num_jobs,
    piece,
    first_layer,
    job_stride,
    PLANES: tl.constexpr,
    TO_BUFFER: tl.constexpr,
    WORD: tl.constexpr,
    TILE: tl.constexpr,
):
    # Move WORD-byte integers: every offset below is in words (see copy_blocks).
    if WORD == 8:
        cache = cache_ptr.to(tl.pointer_type(tl.int64))
        buf = buf_ptr.to(tl.pointer_type(tl.int64))
    elif WORD == 4:
        cache = cache_ptr.to(tl.pointer_type(tl.int32))
        buf = buf_ptr.to(tl.pointer_type(tl.int32))
    elif WORD == 2:
        cache = cache_ptr.to(tl.pointer_type(tl.int16))
        buf = buf_ptr.to(tl.pointer_type(tl.int16))
    else:
        cache = cache_ptr.to(tl.pointer_type(tl.uint8))
        buf = buf_ptr.to(tl.pointer_type(tl.uint8))
    layer_plane = tl.program_id(1)
    tile = tl.program_id(2).to(tl.int64)
    layer = first_layer + layer_plane // PLANES
    plane = (layer_plane % PLANES).to(tl.int64)

    # layer table rows: (element offset from layer 0, plane stride, block stride)
    layer_off = tl.load(layer_table_ptr + layer * 3)
    plane_stride = tl.load(layer_table_ptr + layer * 3 + 1)
    block_stride = tl.load(layer_table_ptr + layer * 3 + 2)
    cols = tile * TILE + tl.arange(0, TILE)
    # Program p moves jobs p, p + job_stride, ...: one job each in a full grid (job_stride
    # = num_jobs), several in a narrow one (layered loads leave the GPU's other work room
    # to run). The loop bounds are plain integers and a job past the end moves nothing
    # (the interpreter cannot loop from a program id).
    first_job = tl.program_id(0)
    for start in range(0, num_jobs, job_stride):
        job = tl.minimum(start + first_job, num_jobs - 1)  # a valid row to read
        mask = cols < tl.where(start + first_job < num_jobs, piece, 0)
        # jobs rows (3, num_jobs): block id, buffer offset of (layer 0, plane 0), layer stride
        block = tl.load(jobs_ptr + job)
        buf_off = tl.load(jobs_ptr + num_jobs + job)
        buf_layer_stride = tl.load(jobs_ptr + 2 * num_jobs + job)
        cache_at = cache + layer_off + plane * plane_stride + block * block_stride + cols
        buf_at = buf + buf_off + layer.to(tl.int64) * buf_layer_stride + plane * piece + cols
        if TO_BUFFER:
            tl.store(buf_at, tl.load(cache_at, mask=mask), mask=mask)
        else:
            tl.store(cache_at, tl.load(buf_at, mask=mask), mask=mask)


_compiled: Any = triton.jit(_copy_blocks, do_not_specialize=["first_layer", "job_stride"])
_interpreted: Any = None


def _interpreted_kernel() -> Any:
    """The same kernel under the Triton interpreter (for CPU tensors: tests, debugging)."""
    global _interpreted
    if _interpreted is None:
        from triton.runtime.interpreter import InterpretedFunction

        _interpreted = InterpretedFunction(_copy_blocks)
    return _interpreted


def launch_shape(piece: int) -> tuple[int, int]:
    """``(tile, num_warps)`` for pieces of ``piece`` words.

    The largest tile that leaves at most 1/16 of its lanes masked in the last tile of a
    piece (else the one that idles fewest), and as many warps as keep ``WORDS_PER_THREAD``
    words per thread.
    """
    if piece <= 0:
        raise ValueError(f"piece must be positive, got {piece}")

    def idle(tile: int) -> float:
        tiles = -(-piece // tile)
        return (tiles * tile - piece) / (tiles * tile)

    tile = next((t for t in TILES if idle(t) <= 1 / 16), min(TILES, key=idle))
    return tile, max(1, tile // (32 * WORDS_PER_THREAD))


def copy_blocks(
    cache_base: torch.Tensor,
    layer_table: torch.Tensor,
    buf_base: torch.Tensor,
    jobs: torch.Tensor,
    *,
    num_layers: int,
    planes: int,
    piece: int,
    to_buffer: bool,
    word: int,
    first_layer: int = 0,
    job_programs: int = 0,
) -> None:
    """Launch the block copy; arguments come checked from ``ops.KVCaches``.

    Layers ``first_layer`` to ``first_layer + num_layers - 1`` are moved (the rows of
    ``layer_table`` and the layer positions in the buffers are absolute). ``job_programs``
    (0: one per job) caps the programs along the job axis; each then loops over jobs.

    ``cache_base``/``buf_base`` are tensors whose data pointers anchor the offsets in
    ``layer_table`` ``(L, 3)`` and ``jobs`` ``(3, J)`` (int64, same device). Offsets and
    ``piece`` count ``word``-byte units (8 when every address and size allows it: wide
    accesses without alignment hints, whatever the KV dtype). Runs on the current CUDA
    stream; CPU tensors run in the interpreter.
    """
    if word not in (1, 2, 4, 8):
        raise ValueError(f"word must be 1, 2, 4 or 8 bytes, got {word}")
    num_jobs = jobs.shape[1]
    if num_jobs == 0:
        return
    tile, num_warps = launch_shape(piece)
    across = min(num_jobs, job_programs) if job_programs > 0 else num_jobs
    grid = (across, num_layers * planes, triton.cdiv(piece, tile))
    args = (cache_base, buf_base, layer_table, jobs, num_jobs, piece, first_layer, across)
    consts = {"PLANES": planes, "TO_BUFFER": to_buffer, "WORD": word, "TILE": tile}
    if cache_base.is_cuda:
        with torch.cuda.device(cache_base.device):  # launch on the cache's GPU
            _compiled[grid](*args, **consts, num_warps=num_warps)
    else:
        _interpreted_kernel()[grid](*args, **consts)
