"""Public gather/scatter: check every argument, then dispatch to torch or Triton.

``KVCaches`` binds an engine's per-layer KV tensors to a ``KVLayout`` and checks shapes,
strides, dtypes and devices once (at registration); its ``gather``/``scatter`` then check
only the per-call arguments (block ids, buffers) and move bytes. The module-level
functions are one-shot conveniences that build a ``KVCaches`` per call.

Dispatch (``backend="auto"``): CPU tensors take the per-run copies of ``reference.py``
executed as single-threaded memcpy (``host.py``, backend ``"numpy"``); CUDA tensors take
the Triton kernel when Triton is importable, else the torch reference (``"torch"``, any
device). ``backend="triton"`` on CPU tensors runs the Triton interpreter (slow; tests).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import operator
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from . import host, reference
from .layouts import KVLayout, LayoutKind, page_order

logger = logging.getLogger(__name__)

Backend = Literal["auto", "numpy", "torch", "triton"]
LAYER_JOB_PROGRAMS = 8
"""Programs along the block axis of a layered load's launches (each loops over its share
of the blocks): enough bytes in flight for the bus, few enough that the attention kernels
running beside the load find free multiprocessors."""
BlockIds = Sequence[int] | torch.Tensor


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it is optional)."""
    return importlib.util.find_spec("triton") is not None


def pin_host_memory(buffer: torch.Tensor) -> bool:
    """Page-lock an existing host buffer (the agent's shared-memory arena, mapped by the
    engine) so that device kernels read and write it directly over the bus, with no staging
    copy on the device. True when the buffer is pinned afterwards; False without CUDA or when
    the driver refuses (then copies go through a device staging buffer, as before). The
    registration lasts as long as the mapping; ``unpin_host_memory`` undoes it."""
    if buffer.device.type != "cpu" or not torch.cuda.is_available():
        return False
    if buffer.is_pinned():
        return True
    cudart: Any = torch.cuda.cudart()  # type: ignore[no-untyped-call]  # torch ships it untyped
    nbytes = buffer.numel() * buffer.element_size()
    rc = cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 0)  # cudaHostRegisterDefault
    if int(rc) != 0:
        _clear_last_cuda_error()
        logger.warning(
            "cudaHostRegister of %d bytes failed (%s): copies will be staged", nbytes, rc
        )
        return False
    # not buffer.is_pinned(): torch asks about the storage's start, which a view into a
    # larger allocation does not share
    return True


def _clear_last_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a refused ``cudaHostRegister``.

    The runtime keeps the refusal as its "last error", and torch's check after its next
    kernel launch raises it, so a registration that merely failed (the copies would only
    have been staged) took down whatever ran next (seen on an H200: "part or all of the
    requested memory range is already mapped" raised by an unrelated ``torch.tensor``).
    torch binds no ``cudaGetLastError``; the runtime it loaded is found in this process's
    mappings and called directly."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()
    except (OSError, AttributeError) as exc:
        logger.debug("could not reset the CUDA runtime's last error: %s", exc)


def unpin_host_memory(buffer: torch.Tensor) -> None:
    """Undo ``pin_host_memory`` (before the mapping goes away)."""
    if buffer.device.type == "cpu" and torch.cuda.is_available():
        cudart: Any = torch.cuda.cudart()  # type: ignore[no-untyped-call]  # torch ships it untyped
        if int(cudart.cudaHostUnregister(buffer.data_ptr())) != 0:
            _clear_last_cuda_error()  # it was not registered: nothing to undo


_readonly_lock = threading.Lock()
_readonly_seen = False


def as_byte_tensor(buffer: memoryview | bytearray | bytes) -> torch.Tensor:
    """A 1-D uint8 tensor over ``buffer`` without copying (e.g. a shared-memory slot).

    Read-only buffers are allowed as scatter sources (never gather into one). torch warns
    once per process about a tensor over read-only memory; that first warning is silenced
    here under a lock, so no later call touches the (process-wide, not thread-safe)
    warning filters.
    """
    global _readonly_seen
    view = memoryview(buffer)
    if view.readonly and not _readonly_seen:
        with _readonly_lock:
            if not _readonly_seen:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    tensor = torch.frombuffer(view, dtype=torch.uint8)
                _readonly_seen = True
                return tensor
    return torch.frombuffer(view, dtype=torch.uint8)


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return strides


def _non_overlapping(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """True when no two indices of a strided view share an element (sufficient test)."""
    dims = sorted((st, sz) for sz, st in zip(sizes, strides, strict=True) if sz > 1)
    extent = 1
    for stride, size in dims:
        if stride < extent:
            return False
        extent += stride * (size - 1)
    return True


class KVCaches:
    """An engine's per-layer KV tensors, checked against a layout, ready to move blocks.

    Build it once when the engine registers its caches; every later call reuses the
    checked views. Calls on CUDA run on the current stream. A host buffer that is pinned
    (``pin_host_memory``) is read or written by the kernel directly and the call is
    asynchronous like any other launch: synchronize the stream (or wait on an event) before
    reading what a gather wrote, and keep a scatter's source alive until then. A pageable
    host buffer goes through a device staging buffer and the gather is synchronous.
    """

    __slots__ = (
        "layout",
        "num_blocks",
        "device",
        "backend",
        "_layers",
        "_groups",
        "_host_groups",
        "_block_nbytes",
        "_piece",
        "_word_dtype",
        "_layer_table",
        "_cache_word",
        "_word_tables",
    )

    def __init__(
        self, kv_caches: Sequence[torch.Tensor], layout: KVLayout, *, backend: Backend = "auto"
    ) -> None:
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a KVLayout, got {type(layout).__name__}")
        given: object = kv_caches
        if isinstance(given, torch.Tensor) or not isinstance(given, Sequence):
            raise TypeError("kv_caches must be a sequence of per-layer tensors")
        if len(kv_caches) != layout.num_layers:
            raise ValueError(
                f"layout has {layout.num_layers} layers but {len(kv_caches)} KV tensors were given"
            )
        self.layout = layout
        # derived sizes, read on every call
        self._block_nbytes = layout.block_nbytes
        self._piece = layout.piece_elems
        self._word_dtype = layout.word_dtype
        first = kv_caches[0]
        if not isinstance(first, torch.Tensor):
            raise TypeError(f"kv_caches[0] is a {type(first).__name__}, not a tensor")
        bdim = layout.block_dim
        self.num_blocks = int(first.shape[bdim]) if first.dim() > bdim else 0
        self.device = first.device
        expected = layout.layer_shape(self.num_blocks)
        self._layers = [self._layer_view(i, t, expected) for i, t in enumerate(kv_caches)]
        self._groups = self._stack(self._layers)
        self.backend = self._resolve(backend)
        self._host_groups: list[host.HostGroup] = (
            [(start, view.numpy()) for start, view in self._groups]
            if self.backend == "numpy"
            else []
        )
        self._layer_table: list[list[int]] | None = None  # bytes: offset, plane, block stride
        self._cache_word = 1
        self._word_tables: dict[int, torch.Tensor] = {}  # word size -> layer table in words
        logger.debug(
            "KVCaches %s: %d blocks on %s, %d layer group(s), backend %s",
            layout.describe(),
            self.num_blocks,
            self.device,
            len(self._groups),
            self.backend,
        )

    # ----------------------------------------------------------------- checks at bind
    def _layer_view(self, i: int, t: torch.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
        """Check layer ``i`` and return it as a ``(planes, num_blocks, piece)`` word view."""
        lay = self.layout
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kv_caches[{i}] is a {type(t).__name__}, not a tensor")
        if t.dtype != lay.dtype:
            raise TypeError(f"kv_caches[{i}] has dtype {t.dtype}, the layout says {lay.dtype}")
        if t.device != self.device:
            raise ValueError(f"kv_caches[{i}] is on {t.device}, kv_caches[0] on {self.device}")
        if tuple(t.shape) != expected:
            raise ValueError(
                f"kv_caches[{i}] has shape {tuple(t.shape)}; the {lay.kind.value} layout "
                f"with {self.num_blocks} blocks needs {expected}"
            )
        if self.num_blocks == 0:
            raise ValueError("the KV tensors hold no blocks")
        if lay.kind is LayoutKind.PAGED:
            _, h, n, c = expected
            page = page_order(h, n, c, *t.stride()[1:])
            if page != lay.page:
                raise ValueError(
                    f"kv_caches[{i}] strides {t.stride()} store a block as "
                    f"{page or 'nothing the kernels know'}; the layout says {lay.page}"
                )
        else:
            inner = lay.block_dim + 1
            shape, stride = [int(d) for d in t.shape[inner:]], t.stride()[inner:]
            want = _contiguous_strides(shape)
            if any(sz > 1 and st != w for sz, st, w in zip(shape, stride, want, strict=True)):
                raise ValueError(
                    f"kv_caches[{i}] strides {t.stride()}: each block's {tuple(shape)} must "
                    f"be contiguous (want inner strides {tuple(want)})"
                )
        block_stride = t.stride()[lay.block_dim]
        if lay.kind is LayoutKind.FLASH_ATTN:
            plane_stride = t.stride()[0]
        elif lay.kind is LayoutKind.PAGED and lay.page == "NC":
            plane_stride = t.stride()[1]
        else:
            plane_stride = block_stride * self.num_blocks
        sizes = (lay.planes, self.num_blocks, lay.piece_elems)
        strides = (plane_stride, block_stride, 1)
        if not _non_overlapping(sizes, strides):
            raise ValueError(f"kv_caches[{i}] strides {t.stride()} make blocks overlap")
        word = t.view(lay.word_dtype)
        return word.as_strided(sizes, strides, word.storage_offset())

    @staticmethod
    def _stack(layers: Sequence[torch.Tensor]) -> list[reference.LayerGroup]:
        """Group consecutive layers stored at one uniform stride into single views."""
        groups: list[reference.LayerGroup] = []
        start = 0
        while start < len(layers):
            first = layers[start]
            shape = [int(d) for d in first.shape]
            end, delta = start + 1, 0
            storage = first.untyped_storage().data_ptr()
            while end < len(layers):
                nxt = layers[end]
                step = int(nxt.storage_offset()) - int(layers[end - 1].storage_offset())
                if (
                    nxt.untyped_storage().data_ptr() != storage
                    or nxt.stride() != first.stride()
                    or step <= 0
                    or (delta and step != delta)
                ):
                    break
                sizes = (end - start + 1, *shape)
                if not _non_overlapping(sizes, (step, *first.stride())):
                    break
                delta = step
                end += 1
            count = end - start
            if count == 1:
                view = first.unsqueeze(0)
            else:
                sizes = (count, *shape)
                view = first.as_strided(sizes, (delta, *first.stride()), first.storage_offset())
            groups.append((start, view))
            start = end
        return groups

    def _resolve(self, backend: Backend) -> Literal["numpy", "torch", "triton"]:
        cpu = self.device.type == "cpu"
        if backend == "auto":
            if cpu:
                return "numpy"
            return "triton" if self.device.type == "cuda" and triton_available() else "torch"
        if backend == "numpy":
            if not cpu:
                raise ValueError(
                    f"backend='numpy' needs CPU tensors; the cache is on {self.device}"
                )
            return "numpy"
        if backend == "torch":
            return "torch"
        if backend == "triton":
            if not triton_available():
                raise RuntimeError("backend='triton' was asked for but triton is not installed")
            return "triton"
        raise ValueError(f"backend must be 'auto', 'numpy', 'torch' or 'triton', got {backend!r}")

    # --------------------------------------------------------------- per-call checks
    @property
    def layer_groups(self) -> int:
        """How many separately stored layer groups a chunk copy touches (1 is best)."""
        return len(self._groups)

    def chunk_nbytes(self, num_blocks: int) -> int:
        """Payload bytes of a chunk of ``num_blocks`` blocks."""
        return self.layout.chunk_nbytes(num_blocks)

    def _ids(self, block_ids: BlockIds, what: str) -> list[int]:
        if isinstance(block_ids, torch.Tensor):
            if block_ids.dim() != 1 or block_ids.dtype.is_floating_point or block_ids.is_complex():
                raise TypeError(
                    f"{what}: block ids must be a 1-D integer tensor, got {block_ids.dtype} "
                    f"of shape {tuple(block_ids.shape)}"
                )
            ids = [int(b) for b in block_ids.tolist()]
        else:
            ids = list(block_ids)
            if not all(type(b) is int for b in ids):  # fast path: plain ints
                ids = [_block_id(b, what) for b in ids]
        if not ids:
            raise ValueError(f"{what}: no block ids")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= self.num_blocks:
            bad = lo if lo < 0 else hi
            raise IndexError(
                f"{what}: block id {bad} is out of range; the cache has {self.num_blocks} blocks"
            )
        return ids

    def _payload(self, buf: torch.Tensor, num_blocks: int | None, what: str) -> torch.Tensor:
        """Check a chunk buffer and return its ``(L, nb, planes, piece)`` word view.

        ``num_blocks=None`` accepts any whole number of blocks (partial scatters)."""
        lay = self.layout
        if not isinstance(buf, torch.Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(buf).__name__}")
        if buf.dtype is not torch.uint8 and buf.dtype is not lay.dtype:
            raise TypeError(f"{what} has dtype {buf.dtype}; use torch.uint8 or {lay.dtype}")
        if buf.dim() != 1 or not buf.is_contiguous():
            raise ValueError(
                f"{what} must be a contiguous 1-D buffer, got shape {tuple(buf.shape)} "
                f"strides {buf.stride()}"
            )
        have = buf.nbytes
        block_nbytes = self._block_nbytes
        if num_blocks is None:
            num_blocks = have // block_nbytes
            if have % block_nbytes or not num_blocks:
                raise ValueError(
                    f"{what} holds {have} bytes, not a whole number of {block_nbytes}-byte "
                    f"blocks of {lay.describe()}"
                )
        if have != num_blocks * block_nbytes:
            raise ValueError(
                f"{what} holds {have} bytes; {num_blocks} block(s) of {lay.describe()} "
                f"take {num_blocks * block_nbytes} bytes"
            )
        if buf.device != self.device and buf.device.type != "cpu":
            raise ValueError(f"{what} is on {buf.device}; the KV cache is on {self.device}")
        try:
            word = buf.view(self._word_dtype)
        except RuntimeError as exc:
            raise ValueError(f"{what} is not aligned to {lay.itemsize} bytes ({exc})") from None
        return word.view(lay.num_layers, num_blocks, lay.planes, self._piece)

    @staticmethod
    def _positions(positions: Sequence[int], count: int, chunk_blocks: int, what: str) -> list[int]:
        pos = [_block_id(p, what) for p in positions]
        if len(pos) != count:
            raise ValueError(f"{what}: {len(pos)} positions for {count} block ids")
        if len(set(pos)) != len(pos) or min(pos) < 0 or max(pos) >= chunk_blocks:
            raise ValueError(
                f"{what}: positions {pos} must be distinct and within the buffer's "
                f"{chunk_blocks} blocks"
            )
        return pos

    # -------------------------------------------------------------------- moving
    def gather(self, block_ids: BlockIds, out: torch.Tensor) -> None:
        """Copy blocks ``block_ids`` of every layer into the chunk buffer ``out``."""
        self.gather_chunks([block_ids], [out])

    def scatter(
        self, src: torch.Tensor, block_ids: BlockIds, *, positions: Sequence[int] | None = None
    ) -> None:
        """Copy the chunk buffer ``src`` into blocks ``block_ids`` of every layer.

        ``positions`` (optional) loads part of a chunk: chunk block ``positions[k]`` of
        ``src`` goes to ``block_ids[k]``; ``src`` then holds the whole chunk."""
        self.scatter_chunks(
            [src], [block_ids], positions=None if positions is None else [positions]
        )

    def gather_chunks(self, block_table: Sequence[BlockIds], outs: Sequence[torch.Tensor]) -> None:
        """Gather many chunks (e.g. a request's worth) in one call: chunk ``c`` is blocks
        ``block_table[c]`` into ``outs[c]``."""
        ids, views = self._batch(block_table, outs, "out")
        if self.backend == "triton":
            self._triton(ids, None, views, to_buffer=True)
            return
        for chunk_ids, view in zip(ids, views, strict=True):
            if view.device != self.device:
                staging = torch.empty(view.shape, dtype=view.dtype, device=self.device)
                reference.gather(self._groups, chunk_ids, staging)
                view.copy_(staging)
            elif self.backend == "numpy":
                host.gather(self._host_groups, chunk_ids, view.numpy())
            else:
                reference.gather(self._groups, chunk_ids, view)

    def scatter_chunks(
        self,
        srcs: Sequence[torch.Tensor],
        block_table: Sequence[BlockIds],
        *,
        positions: Sequence[Sequence[int] | None] | None = None,
    ) -> None:
        """Scatter many chunks in one call: ``srcs[c]`` into blocks ``block_table[c]``.

        ``positions[c]`` (optional, per chunk) as in ``scatter``. A block id may appear
        only once in the whole batch (two writers, one block)."""
        ids, views, pos = self._scatter_args(srcs, block_table, positions)
        if self.backend == "triton":
            self._triton(ids, pos, views, to_buffer=False)
            return
        for chunk_ids, chunk_pos, view in zip(ids, pos, views, strict=True):
            if view.device != self.device:
                reference.scatter(view.to(self.device), self._groups, chunk_ids, chunk_pos)
            elif self.backend == "numpy":
                host.scatter(view.numpy(), self._host_groups, chunk_ids, chunk_pos)
            else:
                reference.scatter(view, self._groups, chunk_ids, chunk_pos)

    def scatter_layers(
        self,
        srcs: Sequence[torch.Tensor],
        block_table: Sequence[BlockIds],
        *,
        positions: Sequence[Sequence[int] | None] | None = None,
        job_programs: int | None = None,
    ) -> Callable[[int], None]:
        """``scatter_chunks`` one layer at a time: checks the batch and builds its job
        table once, and returns ``copy(layer)``, which enqueues that layer's copies on the
        current stream (a layered load calls it per layer, each on the stream and after the
        event it wants). ``job_programs`` narrows each launch (default
        ``LAYER_JOB_PROGRAMS``; 0: one program per block and tile, as ``scatter_chunks``).
        Triton backend only."""
        if self.backend != "triton":
            raise ValueError(f"scatter_layers needs the Triton backend, not {self.backend}")
        if job_programs is None:
            job_programs = LAYER_JOB_PROGRAMS
        if job_programs < 0:
            raise ValueError(f"job_programs must be >= 0, got {job_programs}")
        ids, views, pos = self._scatter_args(srcs, block_table, positions)
        launch = self._triton_plan(ids, pos, views, to_buffer=False, job_programs=job_programs)
        layers = self.layout.num_layers

        def copy(layer: int) -> None:
            if not 0 <= layer < layers:
                raise IndexError(f"layer {layer} is not one of the cache's {layers} layers")
            launch(layer, 1)

        return copy

    def _scatter_args(
        self,
        srcs: Sequence[torch.Tensor],
        block_table: Sequence[BlockIds],
        positions: Sequence[Sequence[int] | None] | None,
    ) -> tuple[list[list[int]], list[torch.Tensor], list[list[int] | None]]:
        ids, views = self._batch(block_table, srcs, "src", positions=positions)
        total = sum(len(i) for i in ids)
        if len({b for i in ids for b in i}) != total:
            raise ValueError("scatter: a block id appears more than once in the batch")
        pos: list[list[int] | None] = [None] * len(ids)
        if positions is not None:
            for c, p in enumerate(positions):
                if p is not None:
                    pos[c] = self._positions(p, len(ids[c]), views[c].shape[1], f"chunk {c}")
        return ids, views, pos

    def _batch(
        self,
        block_table: Sequence[BlockIds],
        bufs: Sequence[torch.Tensor],
        what: str,
        *,
        positions: Sequence[Sequence[int] | None] | None = None,
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        given: object = bufs
        if isinstance(given, torch.Tensor):
            raise TypeError(f"{what}s must be a sequence of buffers, one per chunk")
        if len(block_table) != len(bufs):
            raise ValueError(f"{len(block_table)} block-id lists but {len(bufs)} {what} buffers")
        if positions is not None and len(positions) != len(bufs):
            raise ValueError(f"{len(positions)} position lists for {len(bufs)} chunks")
        ids = [self._ids(b, f"chunk {c}") for c, b in enumerate(block_table)]
        views = []
        for c, (buf, i) in enumerate(zip(bufs, ids, strict=True)):
            whole = positions is None or positions[c] is None
            views.append(self._payload(buf, len(i) if whole else None, f"{what}[{c}]"))
        return ids, views

    def _triton(
        self,
        ids: list[list[int]],
        positions: list[list[int] | None] | None,
        views: list[torch.Tensor],
        *,
        to_buffer: bool,
    ) -> None:
        launch = self._triton_plan(ids, positions, views, to_buffer=to_buffer)
        launch(0, self.layout.num_layers)

    def _triton_plan(
        self,
        ids: list[list[int]],
        positions: list[list[int] | None] | None,
        views: list[torch.Tensor],
        *,
        to_buffer: bool,
        job_programs: int = 0,
    ) -> Callable[[int, int], None]:
        """Everything a batch's kernel launches share (staging, word size, job table);
        returns ``launch(first_layer, num_layers)``. A staged gather copies back to the
        host after the launch that covers the last layer."""
        from . import triton_kernels

        lay = self.layout
        isz = lay.itemsize
        if self._layer_table is None:
            base = self._layers[0].data_ptr()
            self._layer_table = [
                [v.data_ptr() - base, v.stride()[0] * isz, v.stride()[1] * isz]
                for v in self._layers
            ]
            self._cache_word = _word_size(
                base, self._piece * isz, *(x for row in self._layer_table for x in row)
            )
        local = all(v.device == self.device for v in views)
        # Pinned (page-locked) host buffers are addressable from the device: the kernel
        # reads and writes them over the bus, one pass, no staging copy.
        direct = not local and all(v.device.type == "cpu" and v.is_pinned() for v in views)
        if local or direct:
            bufs = views
        else:  # a host buffer for a device cache: go through one device staging buffer
            staging = torch.empty(
                sum(v.numel() for v in views), dtype=lay.word_dtype, device=self.device
            )
            bufs, at = [], 0
            for v in views:
                part = staging[at : at + v.numel()].view(v.shape)
                if not to_buffer:
                    part.copy_(v)
                bufs.append(part)
                at += v.numel()
        word = min(self._cache_word, _word_size(*(b.data_ptr() for b in bufs)))
        table = self._word_tables.get(word)
        if table is None:  # at most four, built once each
            rows = [[x // word for x in row] for row in self._layer_table]
            table = torch.tensor(rows, dtype=torch.int64, device=self.device)
            self._word_tables[word] = table
        base_ptr = bufs[0].data_ptr()
        block_words = lay.planes * self._piece * isz // word
        blocks: list[int] = []
        offsets: list[int] = []
        strides: list[int] = []
        for c, (chunk_ids, buf) in enumerate(zip(ids, bufs, strict=True)):
            start = (buf.data_ptr() - base_ptr) // word
            layer_stride = buf.shape[1] * block_words
            chunk_pos = positions[c] if positions is not None else None
            for j, b in enumerate(chunk_ids):
                blocks.append(b)
                offsets.append(start + (j if chunk_pos is None else chunk_pos[j]) * block_words)
                strides.append(layer_stride)
        jobs = torch.tensor([blocks, offsets, strides], dtype=torch.int64, device=self.device)

        def launch(first_layer: int, num_layers: int) -> None:
            triton_kernels.copy_blocks(
                self._layers[0],
                table,
                bufs[0],
                jobs,
                num_layers=num_layers,
                planes=lay.planes,
                piece=self._piece * isz // word,
                to_buffer=to_buffer,
                word=word,
                first_layer=first_layer,
                job_programs=job_programs,
            )
            staged = to_buffer and not local and not direct
            if staged and first_layer + num_layers == lay.num_layers:
                for v, part in zip(views, bufs, strict=True):
                    v.copy_(part)

        return launch


def _word_size(*values: int) -> int:
    """The widest of 8, 4, 2, 1 bytes dividing every address and byte count given."""
    for word in (8, 4, 2):
        if all(v % word == 0 for v in values):
            return word
    return 1


def _block_id(b: object, what: str) -> int:
    """An integer-like block id (numpy ints too); never a bool or a float."""
    if isinstance(b, bool):
        raise TypeError(f"{what}: {b!r} is not an integer block id")
    try:
        return operator.index(b)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what}: {b!r} is not an integer block id") from None


def gather(
    kv_caches: Sequence[torch.Tensor],
    block_ids: BlockIds,
    out: torch.Tensor,
    layout: KVLayout,
    *,
    backend: Backend = "auto",
) -> None:
    """One-shot gather: blocks ``block_ids`` of every layer into ``out`` (layer-major)."""
    KVCaches(kv_caches, layout, backend=backend).gather(block_ids, out)


def scatter(
    buffer: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    block_ids: BlockIds,
    layout: KVLayout,
    *,
    backend: Backend = "auto",
) -> None:
    """One-shot scatter: the chunk ``buffer`` into blocks ``block_ids`` of every layer."""
    KVCaches(kv_caches, layout, backend=backend).scatter(buffer, block_ids)
