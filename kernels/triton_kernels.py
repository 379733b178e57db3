"""Triton gather/scatter of engine blocks by block-id table, for GPUs.

One program moves one tile of one plane of one block of one layer: the grid is
``(jobs, num_layers * planes, tiles_per_piece)`` where a *job* is one block of one chunk.
All chunks of a batch go in one launch, which is what makes a request's worth of chunks
cheap to move.

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

#: Words per program (8 KiB with 8-byte words): a small grid for whole 64-256 KiB planes,
#: a masked tail for odd piece sizes.
TILE = 1024


# Triton resolves a kernel's annotations in this module's globals and accepts only
# ``tl.constexpr`` there, so the pointer and size parameters carry none (hence the ignore).
def _copy_blocks(  # type: ignore[no-untyped-def]
    cache_ptr,
    buf_ptr,
    layer_table_ptr,
    jobs_ptr,
    num_jobs,
    piece,
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
    job = tl.program_id(0)
    layer_plane = tl.program_id(1)
    tile = tl.program_id(2).to(tl.int64)
    layer = layer_plane // PLANES
    plane = (layer_plane % PLANES).to(tl.int64)

    # layer table rows: (element offset from layer 0, plane stride, block stride)
    layer_off = tl.load(layer_table_ptr + layer * 3)
    plane_stride = tl.load(layer_table_ptr + layer * 3 + 1)
    block_stride = tl.load(layer_table_ptr + layer * 3 + 2)
    # jobs rows (3, num_jobs): block id, buffer offset of (layer 0, plane 0), layer stride
    block = tl.load(jobs_ptr + job)
    buf_off = tl.load(jobs_ptr + num_jobs + job)
    buf_layer_stride = tl.load(jobs_ptr + 2 * num_jobs + job)

    cols = tile * TILE + tl.arange(0, TILE)
    mask = cols < piece
    cache_at = cache + layer_off + plane * plane_stride + block * block_stride + cols
    buf_at = buf + buf_off + layer.to(tl.int64) * buf_layer_stride + plane * piece + cols
    if TO_BUFFER:
        tl.store(buf_at, tl.load(cache_at, mask=mask), mask=mask)
    else:
        tl.store(cache_at, tl.load(buf_at, mask=mask), mask=mask)


_compiled: Any = triton.jit(_copy_blocks)
_interpreted: Any = None


def _interpreted_kernel() -> Any:
    """The same kernel under the Triton interpreter (for CPU tensors: tests, debugging)."""
    global _interpreted
    if _interpreted is None:
        from triton.runtime.interpreter import InterpretedFunction

        _interpreted = InterpretedFunction(_copy_blocks)
    return _interpreted


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
) -> None:
    """Launch the block copy; arguments come checked from ``ops.KVCaches``.

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
    grid = (num_jobs, num_layers * planes, triton.cdiv(piece, TILE))
    args = (cache_base, buf_base, layer_table, jobs, num_jobs, piece)
    consts = {"PLANES": planes, "TO_BUFFER": to_buffer, "WORD": word, "TILE": TILE}
    if cache_base.is_cuda:
        with torch.cuda.device(cache_base.device):  # launch on the cache's GPU
            _compiled[grid](*args, **consts)
    else:
        _interpreted_kernel()[grid](*args, **consts)
