"""Worker side of the meshkv connector: copy whole engine blocks to and from the arena.

Loads: synchronous loads run in ``start_load_kv`` before the forward pass (read/pin the
chunks, scatter arena → blocks, release). Asynchronous loads (chunks on SSD, on a peer, or
coming from a prefill engine's transfer) wait up to the load's ``wait_s`` for the agent's
flights on one of ``LOAD_LANES`` background lanes (a thread with its own agent connection,
so that one slow transfer never holds up the others); the copy into the engine's blocks
then happens on the engine's own thread in ``get_finished`` (a background thread would
fight the engine's busy loop for the GIL on every block: measured ~110 ms for 24 MiB
against ~3 ms on the engine thread), and the request is reported finished there. A chunk
that does not arrive, or arrives with the wrong size, is never copied: its blocks go to
``get_block_ids_with_load_errors`` and vLLM recomputes from the first of them. On a GPU
the engine thread never waits for a load's copy (``DeviceCopies``): the copies are
enqueued, layer by layer with ``layer_loads``, the chunks are hashed beside them and the
leases released once both are done.

Saves keep the agent off the engine's critical path. Only the copy out of the engine's
blocks happens inside the step (``wait_for_save``: a gather into reserved arena slots, which
must finish before vLLM may reuse the blocks); the round trips around it run on the save
thread. The ``reserve`` for the step's chunks is sent when vLLM binds the step's metadata
(``prepare``, before the forward pass: ``start_load_kv`` runs after it in steps without
synchronous loads) and is answered while the forward pass runs; the ``commit`` (plus a
transfer's ``hold``) is sent after the gather without waiting for it. If the reserve is not
answered by ``save_timeout_s``, or the agent refuses (no space) or is down, the chunks are
skipped and counted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import TYPE_CHECKING, Protocol

import torch

from meshkv.chunk import ChunkKey, payload_checksum
from meshkv.client import TransferHold
from meshkv.errors import ConfigError, MeshKVError, NoSpace
from meshkv.kernels import KVCaches, KVLayout, as_byte_tensor

from .config import ConnectorConfig
from .events import SavedChunk, SavedChunks
from .layout import EngineLayout
from .metadata import ChunkLoad, ChunkSave, LoadSpec, MeshKVConnectorMetadata, SaveSpec
from .stats import ConnectorCounters

if TYPE_CHECKING:
    from meshkv.client import Lease, Reserved

logger = logging.getLogger(__name__)

NO_SPACE = "no space in the agent's arena"
"""Why a save was skipped when the reserve found no room: one reason in the skip log,
whether the whole step or only its last chunks found none."""

SKIP_LOG_INTERVAL_S = 10.0
"""Skipped saves are logged at most once per this many seconds (with the count since)."""


class SkipLog:
    """A warning for saves that did not happen, at most once per interval, with the count
    per reason since the last one: a dead agent skips every step's save, and the engine's
    log must not fill with that."""

    def __init__(self, interval_s: float = SKIP_LOG_INTERVAL_S) -> None:
        self._interval = interval_s
        self._last = -float("inf")
        self._unlogged: dict[str, int] = {}
        self._lock = threading.Lock()

    def skipped(self, chunks: int, why: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._unlogged[why] = self._unlogged.get(why, 0) + chunks
            if now - self._last < self._interval:
                return
            counts, self._unlogged, self._last = self._unlogged, {}, now
        total = sum(counts.values())
        if len(counts) == 1:
            reasons = why
        else:
            reasons = "; ".join(f"{n} because {w}" for w, n in counts.items())
        logger.warning("meshkv skipped saving %d chunk(s): %s", total, reasons)


LOAD_LANES = 4
"""Background lanes for asynchronous loads (threads, each with its own agent connection)."""
HASH_THREADS = min(8, os.cpu_count() or 1)
"""GPU engines: threads hashing loaded chunks (``verify_loads``) while they copy."""


class WorkerAgent(Protocol):
    """What the worker side needs of its agent (``link.WorkerLink`` in an engine, a fake in
    unit tests). ``lane`` 0 is the engine's own thread, 1..``LOAD_LANES`` the background
    lanes; a lease must be released on the lane that read it."""

    def read(self, keys: list[ChunkKey], wait: float, *, lane: int) -> list[Lease | None]: ...

    def release(self, leases: Sequence[Lease], *, lane: int) -> None: ...

    def reserve(
        self, keys: list[ChunkKey], sizes: list[int], budget: float | None = None
    ) -> Reserved:
        """Partial: the last ``unplaced`` keys may come back None for want of room."""
        ...

    def commit(
        self, keys: list[ChunkKey], tokens: list[int], checksums: list[int | None]
    ) -> None: ...

    def pin_arenas(self) -> None:
        """Page-lock the agent's arena wherever it is (or will be) mapped (GPU engines)."""

    def warm_up(self) -> None:
        """Connect every path to the agent and map its arena now (at registration), so no
        load pays for the connect and the mapping inside its deadline. A missing agent is
        only logged, like any later outage."""

    def report_corrupt(self, keys: list[ChunkKey]) -> None:
        """These chunks failed their checksum after a load: have the agent re-check and
        drop them (a verified read)."""

    def abort(self, keys: list[ChunkKey]) -> None: ...

    def hold(self, keys: list[ChunkKey], hold: TransferHold) -> int: ...

    def close(self) -> None: ...


class WorkerSide:
    """Implements the worker-role methods of ``MeshKVConnector``."""

    def __init__(
        self,
        cfg: ConnectorConfig,
        layout: EngineLayout,
        counters: ConnectorCounters,
        tp_rank: int,
        agent: WorkerAgent,
    ) -> None:
        self._cfg = cfg
        self._layout = layout
        self._counters = counters
        self._rank = tp_rank
        self._agent = agent
        self._device: DeviceCopies | None = None
        self._blocks_per_chunk = cfg.chunk_tokens // layout.block_size
        self._caches: KVCaches | None = None
        self._layer_ready: dict[str, torch.cuda.Event] = {}  # this step's layered loads
        # GPU: loaded chunks being hashed while they copy, settled before the step's errors
        self._hash_pool: ThreadPoolExecutor | None = None
        self._checks: list[tuple[str, ChunkLoad, Lease, Future[int]]] = []  # (request, ...)
        # leases whose copies or hashes may still run: (event after the copies, hashes,
        # leases, lane that read them)
        self._pending: list[
            tuple[torch.cuda.Event | None, list[Future[int]], list[Lease], int]
        ] = []
        self._block_bytes = 0
        self._lock = threading.Lock()
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()
        # One thread per load lane (its own agent connection); one save thread, which
        # keeps reserve → commit of successive steps in order.
        self._lanes = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"meshkv-load-{i + 1}")
            for i in range(LOAD_LANES)
        ]
        self._lane_busy = [0] * LOAD_LANES
        self._save_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshkv-save")
        self._skips = SkipLog()
        self._async: dict[str, tuple[Future[list[Lease | None] | None], LoadSpec, int]] = {}
        self._reserving: Future[Reserved] | None = None
        self._reserved_for: list[ChunkSave] = []
        self._reserve_budget = cfg.save_timeout_s
        self.report_saves = False
        """Report committed chunks for vLLM's KV events (``take_saved``)."""
        self._saved: list[SavedChunk] = []  # committed since the last take_saved

    # --- registration ------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self._layout.layer_names if name not in kv_caches]
        if missing:
            raise MeshKVError(f"meshkv connector: vLLM registered no KV cache for {missing}")
        tensors = [kv_caches[name] for name in self._layout.layer_names]
        kv_layout = engine_kv_layout(tensors, self._layout)
        self._caches = KVCaches(tensors, kv_layout)
        if self._caches.device.type == "cuda":
            self._device = DeviceCopies(self._caches.device)
            self._hash_pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="meshkv-hash")
            if self._cfg.layer_loads and self._caches.backend != "triton":
                logger.warning(
                    "meshkv layer_loads needs Triton (backend is %s): loads copy all layers "
                    "at once", self._caches.backend,
                )  # fmt: skip
            self._agent.pin_arenas()  # mapped from now on page-locked: direct kernel copies
        self._block_bytes = self._caches.chunk_nbytes(1)
        # After pin_arenas: the mapping made here is the one the kernels copy through.
        self._agent.warm_up()
        logger.info(
            "meshkv connector: %d layers, %d blocks, %d bytes per %d-token chunk, rank %d",
            len(tensors),
            self._caches.num_blocks,
            self._block_bytes * self._blocks_per_chunk,
            self._cfg.chunk_tokens,
            self._rank,
        )

    # --- loads -------------------------------------------------------------------------

    def prepare(self, meta: MeshKVConnectorMetadata) -> None:
        """The step's metadata was bound (before its forward pass): start the reserve."""
        self._start_reserve(meta)

    def start_load_kv(self, meta: MeshKVConnectorMetadata) -> None:
        self._settle_layers()
        self._reap()
        for spec in meta.loads:
            if spec.is_async:
                lane = min(range(LOAD_LANES), key=self._lane_busy.__getitem__)
                self._lane_busy[lane] += 1
                future = self._lanes[lane].submit(self._fetch, spec, lane + 1, time.perf_counter())
                self._async[spec.req_id] = (future, spec, lane)
            else:
                failed = self._copy(spec, self._fetch(spec, 0, None), 0)
                if failed:
                    with self._lock:
                        self._load_errors |= failed
                        self._failed_reqs.add(spec.req_id)

    def _fetch(
        self, spec: LoadSpec, lane: int, submitted: float | None
    ) -> list[Lease | None] | None:
        """Pin one request's chunks (waiting up to ``wait_s`` for the agent to bring them
        into memory: from peers or SSD off the step, from SSD inside it); None when the
        agent could not be asked."""
        started = time.perf_counter()
        if submitted is not None:
            self._counters.async_queue_seconds += started - submitted
        keys = [chunk.keys[self._rank] for chunk in spec.chunks]
        wait = spec.wait_s
        try:
            if self._caches is None:
                raise MeshKVError("KV caches were never registered")
            return self._agent.read(keys, wait, lane=lane)
        except MeshKVError as exc:
            logger.warning("meshkv load of %s failed: %s", spec.req_id, exc)
            return None
        finally:
            elapsed = time.perf_counter() - started
            self._counters.call_seconds += elapsed
            if spec.is_async:
                self._counters.async_wait_seconds += elapsed

    def _copy(self, spec: LoadSpec, leases: list[Lease | None] | None, lane: int) -> set[int]:
        """Copy pinned chunks into the engine's blocks (on the engine's thread); release
        them on ``lane`` once the copies are done; return the block ids that could not be
        loaded."""
        caches = self._caches
        if leases is None or caches is None:
            self._counters.load_errors += len(spec.chunks)
            return set(spec.block_ids())
        started = time.perf_counter()
        failed: set[int] = set()
        done: torch.cuda.Event | None = None
        hashes: list[Future[int]] = []
        try:
            usable = self._usable(spec, leases, failed)
            if self._device is None:
                self._scatter(caches, usable)
                if self._cfg.verify_loads:  # after the copy: also what changed during it
                    usable = self._verified(usable, failed)
            else:
                if self._cfg.verify_loads:  # first: the hashes start while the copies launch
                    hashes = self._hash_while_copying(spec.req_id, usable)
                done = self._scatter_device(caches, usable, layered=not spec.is_async)
            self._counters.loaded_chunks += len(usable)
            self._counters.loaded_bytes += sum(c.num_blocks for c, _ in usable) * self._block_bytes
        except BaseException:
            if self._device is not None:  # a copy may have been enqueued before the error
                torch.cuda.synchronize(self._device.device)
            raise
        finally:
            elapsed = time.perf_counter() - started
            self._counters.call_seconds += elapsed
            if spec.is_async:
                self._counters.async_copy_seconds += elapsed
            held = [lease for lease in leases if lease is not None]
            if held:
                # the copies and the hashes read the leased slots until they finish
                self._pending.append((done, hashes, held, lane))
                self._reap()
        return failed

    def _usable(
        self, spec: LoadSpec, leases: list[Lease | None], failed: set[int]
    ) -> list[tuple[ChunkLoad, Lease]]:
        """The chunks to copy: each leased with the expected size, up to the first that is
        not (everything after it is recomputed anyway); the others' blocks go to ``failed``."""
        usable: list[tuple[ChunkLoad, Lease]] = []
        for chunk, lease in zip(spec.chunks, leases, strict=True):
            expected = chunk.num_blocks * self._block_bytes
            if failed or lease is None or lease.view.nbytes != expected:
                if lease is not None and lease.view.nbytes != expected:
                    logger.warning(
                        "meshkv chunk %s has %d bytes, expected %d; recomputing",
                        lease.key.hex(), lease.view.nbytes, expected,
                    )  # fmt: skip
                self._counters.load_errors += 1
                failed.update(block for _, block in chunk.blocks)
                continue
            usable.append((chunk, lease))
        return usable

    def _verified(
        self, chunks: list[tuple[ChunkLoad, Lease]], failed: set[int]
    ) -> list[tuple[ChunkLoad, Lease]]:
        """The chunks whose arena bytes still hash to the checksum taken at commit. A chunk
        damaged in the shared arena is never used: its blocks go to ``failed`` (vLLM
        recomputes them) and the agent is told to drop it."""
        started = time.perf_counter()
        good: list[tuple[ChunkLoad, Lease]] = []
        bad: list[ChunkKey] = []
        for chunk, lease in chunks:
            # no checksum yet: it is being computed from these very bytes
            if lease.checksum is not None and self._damaged(lease, payload_checksum(lease.view)):
                bad.append(lease.key)
                failed.update(block for _, block in chunk.blocks)
            else:
                good.append((chunk, lease))
        self._counters.verify_seconds += time.perf_counter() - started
        self._count_damaged(bad, loaded=False)
        return good

    def _damaged(self, lease: Lease, digest: int | None) -> bool:
        """Whether a loaded chunk's hash (None: could not be taken) betrays damage."""
        if digest is not None and digest == lease.checksum:
            return False
        logger.error(
            "meshkv chunk %s changed after it was committed; recomputing it", lease.key.hex()
        )
        return True

    def _count_damaged(self, keys: list[ChunkKey], *, loaded: bool) -> None:
        """Count damaged chunks (``loaded``: already counted as loaded) and tell the agent."""
        if keys:
            self._counters.corrupt_chunks += len(keys)
            self._counters.load_errors += len(keys)
            if loaded:
                self._counters.loaded_chunks -= len(keys)
            self._save_pool.submit(self._report, keys)

    def _hash_while_copying(
        self, req_id: str, chunks: list[tuple[ChunkLoad, Lease]]
    ) -> list[Future[int]]:
        """GPU: hash the chunks' arena bytes on the hash threads while the device copies
        them (xxhash releases the GIL), so the engine thread never hashes. The results are
        settled after the forward pass, in ``wait_for_save`` (before the step's saves: a
        request that read a damaged chunk saves nothing computed from it) or at the latest
        in ``get_block_ids_with_load_errors``: a damaged chunk's blocks are reported there,
        and vLLM discards that step's output of the requests that read them and recomputes
        (as for any failed load)."""
        pool = self._hash_pool
        assert pool is not None
        checks = [
            (req_id, chunk, lease, pool.submit(payload_checksum, lease.view))
            for chunk, lease in chunks
            if lease.checksum is not None  # none yet: being computed from these bytes
        ]
        self._checks.extend(checks)
        return [future for _, _, _, future in checks]

    def _settle_checks(self) -> None:
        """Wait for the hashes of the chunks loaded so far; count and report the damaged."""
        checks, self._checks = self._checks, []
        if not checks:
            return
        started = time.perf_counter()
        bad: list[ChunkKey] = []
        for req_id, chunk, lease, future in checks:
            try:
                digest: int | None = future.result()
            except Exception:  # cannot hash: do not trust it
                logger.exception("meshkv could not hash loaded chunk %s", lease.key.hex())
                digest = None
            if self._damaged(lease, digest):
                bad.append(lease.key)
                with self._lock:
                    self._load_errors.update(block for _, block in chunk.blocks)
                    self._failed_reqs.add(req_id)  # its blocks of this step are not valid
        self._counters.verify_seconds += time.perf_counter() - started
        self._count_damaged(bad, loaded=True)

    def _report(self, keys: list[ChunkKey]) -> None:
        try:
            self._agent.report_corrupt(keys)
        except MeshKVError as exc:
            logger.debug("meshkv could not report corrupt chunks: %s", exc)

    def _reap(self, *, wait: bool = False) -> None:
        """Release the leases whose copies are done (all of them with ``wait``), each on the
        connection that read it: the agent ties a lease to its connection. Runs on the
        engine's thread, which owns lane 0."""
        pending, self._pending = self._pending, []
        for entry in pending:
            done, hashes, held, lane = entry
            busy = done is not None and not done.query()  # type: ignore[no-untyped-call]
            if not wait and (busy or not all(h.done() for h in hashes)):
                self._pending.append(entry)
                continue
            if done is not None:
                done.synchronize()
            for h in hashes:
                h.exception()  # waits; a failed hash is settled (and logged) elsewhere
            if lane == 0:
                self._release(held, 0)
            else:
                self._lanes[lane - 1].submit(self._release, held, lane)

    def _release(self, leases: list[Lease], lane: int) -> None:
        try:
            self._agent.release(leases, lane=lane)
        except MeshKVError as exc:
            # A dead connection releases its pins on the agent side; leases also expire.
            logger.debug("meshkv release failed: %s", exc)

    @staticmethod
    def _batch(
        chunks: list[tuple[ChunkLoad, Lease]],
    ) -> tuple[list[torch.Tensor], list[list[int]], list[list[int] | None]]:
        """Sources, block ids and (for chunks vLLM partly computed) positions of a batch."""
        srcs = [as_byte_tensor(lease.view) for _, lease in chunks]
        ids = [[block for _, block in chunk.blocks] for chunk, _ in chunks]
        positions: list[list[int] | None] = [
            None if len(chunk.blocks) == chunk.num_blocks else [j for j, _ in chunk.blocks]
            for chunk, _ in chunks
        ]
        return srcs, ids, positions

    def _scatter(self, caches: KVCaches, chunks: list[tuple[ChunkLoad, Lease]]) -> None:
        if chunks:
            srcs, ids, positions = self._batch(chunks)
            caches.scatter_chunks(srcs, ids, positions=positions)

    def _scatter_device(
        self, caches: KVCaches, chunks: list[tuple[ChunkLoad, Lease]], *, layered: bool
    ) -> torch.cuda.Event | None:
        """Enqueue the copies on the GPU; the event after them (None: nothing to copy).
        Layered (``layer_loads``, synchronous loads): one launch per layer on the load
        stream, sharing one job table, and an event per layer that ``wait_for_layer_load``
        makes attention wait on."""
        device = self._device
        assert device is not None
        if not chunks:
            return None
        srcs, ids, positions = self._batch(chunks)
        if not (layered and self._cfg.layer_loads and caches.backend == "triton"):
            return device.load(lambda: caches.scatter_chunks(srcs, ids, positions=positions))
        names = self._layout.layer_names
        events = device.load_layers(
            partial(caches.scatter_layers, srcs, ids, positions=positions), len(names)
        )
        self._layer_ready.update(zip(names, events, strict=True))
        return events[-1]

    def wait_for_layer_load(self, layer_name: str) -> None:
        """With ``layer_loads`` on a GPU: attention on this layer waits for its copy only.
        Otherwise everything a step needs was loaded in ``start_load_kv``."""
        event = self._layer_ready.pop(layer_name, None)
        if event is not None and self._device is not None:
            self._device.wait(event)

    def _settle_layers(self) -> None:
        """After the forward pass: layers that vLLM never waited for (it calls
        ``wait_for_layer_load`` per attention layer) are waited for now, so no later work
        reads a block before its copy."""
        if self._layer_ready and self._device is not None:
            logger.warning(
                "meshkv: vLLM did not wait for the load of %d layer(s) (%s, ...) in this step",
                len(self._layer_ready), next(iter(self._layer_ready)),
            )  # fmt: skip
            for event in self._layer_ready.values():
                self._device.wait(event)
        self._layer_ready.clear()

    # --- saves -------------------------------------------------------------------------

    def _savable(self, meta: MeshKVConnectorMetadata) -> list[SaveSpec]:
        """The step's saves, less those of requests whose load failed in this step: their
        blocks are not valid yet, so neither their chunks nor their transfer hold go out
        (the scheduler plans both again)."""
        with self._lock:
            failed = set(self._failed_reqs)
        return [spec for spec in meta.saves if spec.req_id not in failed]

    def _start_reserve(self, meta: MeshKVConnectorMetadata) -> None:
        """Send this step's reserve now, so the answer comes while the forward pass runs."""
        self._reserving = None
        self._reserved_for = []
        if not meta.saves or self._caches is None:
            return
        chunks = [c for spec in meta.saves for c in spec.chunks]
        if not chunks:
            return
        keys = [c.keys[self._rank] for c in chunks]
        sizes = [len(c.block_ids) * self._block_bytes for c in chunks]
        self._reserved_for = chunks
        self._reserve_budget = self._cfg.save_timeout_s
        if any(spec.transfer and spec.chunks for spec in meta.saves):
            self._reserve_budget = max(self._cfg.save_timeout_s, self._cfg.transfer_save_timeout_s)
        self._reserving = self._save_pool.submit(
            self._agent.reserve, keys, sizes, self._reserve_budget
        )

    def wait_for_save(self, meta: MeshKVConnectorMetadata) -> None:
        self._settle_layers()
        self._settle_checks()  # before choosing what to save (``_savable``)
        caches = self._caches
        if not meta.saves or caches is None:
            return
        started = time.perf_counter()
        chunks = self._reserved_for
        device = self._device
        try:
            slots = self._reserved_slots()
            specs = self._savable(meta)
            wanted = {id(c) for spec in specs for c in spec.chunks}
            done: list[ChunkKey] = []
            views: list[memoryview] = []
            tokens: list[int] = []
            skipped: list[ChunkKey] = []
            try:
                if device is not None:
                    device.begin_saves()  # gathers on a side stream, after this forward pass
                placed = len(chunks) - (slots.unplaced if slots is not None else 0)
                for i, (chunk, slot) in enumerate(zip(chunks, slots or (), strict=False)):
                    if slot is None:
                        if i < placed:
                            self._counters.save_duplicates += 1
                        continue
                    if id(chunk) not in wanted:
                        skipped.append(slot.key)
                        continue
                    if device is not None:
                        with device.saving():
                            caches.gather(list(chunk.block_ids), as_byte_tensor(slot.view))
                    else:
                        caches.gather(list(chunk.block_ids), as_byte_tensor(slot.view))
                    done.append(slot.key)
                    views.append(slot.view)
                    tokens.append(chunk.num_tokens)
            except BaseException:
                keys = [s.key for s in slots or () if s is not None]
                self._save_pool.submit(self._quiet_abort, keys)
                self._counters.save_skipped += len(chunks)
                raise
            copied = device.end_saves() if device is not None else None
            self._save_pool.submit(self._finish_save, done, views, tokens, skipped, specs, copied)
        finally:
            self._reserving = None
            self._reserved_for = []
            self._counters.call_seconds += time.perf_counter() - started

    def _reserved_slots(self) -> Reserved | None:
        """The answer of this step's reserve; None (the chunks skipped, counted) when it did
        not come in time or the agent refused."""
        chunks, future = self._reserved_for, self._reserving
        if future is None:
            return None
        try:
            slots = future.result(timeout=self._reserve_budget)
        except FutureTimeout:
            why = f"the agent did not answer the reserve within {self._reserve_budget} s"
            future.add_done_callback(self._abort_late)  # give it back once it lands
        except NoSpace:
            why = NO_SPACE
        except MeshKVError as exc:
            why = str(exc)
        else:
            if slots.unplaced:
                self._skips.skipped(slots.unplaced, NO_SPACE)
                self._counters.save_skipped += slots.unplaced
            return slots
        self._skips.skipped(len(chunks), why)
        self._counters.save_skipped += len(chunks)
        return None

    def _abort_late(self, future: Future[Reserved]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        keys = [s.key for s in future.result() if s is not None]
        if keys:
            self._save_pool.submit(self._quiet_abort, keys)

    def _finish_save(
        self,
        done: list[ChunkKey],
        views: list[memoryview],
        tokens: list[int],
        skipped: list[ChunkKey],
        specs: list[SaveSpec],
        copied: torch.cuda.Event | None = None,
    ) -> None:
        """On the save thread: checksum and commit what was copied (the agent then never
        hashes these chunks itself: a peer or the SSD gets them at once), give back what was
        not, hold the transfers whose prompts are now saved. ``copied``: on a GPU, the
        event after the step's gathers; the bytes are read only once it has passed."""
        if copied is not None:
            copied.synchronize()  # this thread waits for the copies, never the engine
        if skipped:
            self._quiet_abort(skipped)
        if done:
            checksums: list[int | None] = [payload_checksum(v) for v in views]
            try:
                self._agent.commit(done, tokens, checksums)
                if self.report_saves:
                    committed = set(done)
                    saved = [
                        (spec.req_id, c.index)
                        for spec in specs
                        for c in spec.chunks
                        if c.keys[self._rank] in committed
                    ]
                    with self._lock:
                        self._saved.extend(saved)
                self._counters.saved_chunks += len(done)
                self._counters.saved_bytes += sum(
                    self._block_bytes * -(-n // self._layout.block_size) for n in tokens
                )
            except MeshKVError as exc:
                self._skips.skipped(len(done), f"commit failed: {exc}")
                self._counters.save_skipped += len(done)
                self._quiet_abort(done)
        for spec in specs:
            if spec.hold is None:
                continue
            h = spec.hold
            keys = [k[self._rank] for k in h.keys]
            try:
                self._agent.hold(keys, TransferHold(h.transfer_id, h.hold_s, h.push_to))
            except MeshKVError as exc:
                logger.info("meshkv hold of transfer %s failed: %s", h.transfer_id, exc)

    def _quiet_abort(self, keys: list[ChunkKey]) -> None:
        if not keys:
            return
        try:
            self._agent.abort(keys)
        except MeshKVError as exc:
            logger.debug("meshkv abort failed: %s", exc)

    # --- completion --------------------------------------------------------------------

    def get_finished(self) -> set[str]:
        """Requests whose asynchronous load ended (successfully or not) since last call;
        their chunks are copied into the engine's blocks here, on the engine's thread."""
        self._reap()
        done = [req_id for req_id, (fut, _, _) in self._async.items() if fut.done()]
        for req_id in done:
            fut, spec, lane = self._async.pop(req_id)
            self._lane_busy[lane] -= 1
            try:
                failed = self._copy(spec, fut.result(), lane + 1)
            except Exception:  # a bug in the load path must not take the engine down
                logger.exception("meshkv async load of %s crashed", req_id)
                failed = set(spec.block_ids())
                self._counters.load_errors += 1
            if failed:
                with self._lock:
                    self._load_errors |= failed
        return set(done)

    def take_saved(self) -> SavedChunks | None:
        """Chunks committed since the last call, for the scheduler's KV events."""
        with self._lock:
            saved, self._saved = self._saved, []
        return SavedChunks(saved) if saved else None

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._settle_checks()
        self._reap()
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
            self._failed_reqs.clear()
        return errors

    def close(self) -> None:
        self._settle_checks()
        self._reap(wait=True)
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True)
        for lane in self._lanes:
            lane.shutdown(wait=True, cancel_futures=True)
        self._save_pool.shutdown(wait=True)  # pending commits are short; let them land
        self._agent.close()


def engine_kv_layout(tensors: list[torch.Tensor], layout: EngineLayout) -> KVLayout:
    """The layout of the caches vLLM registered, read off the tensors themselves (vLLM
    >= 0.32 gives every backend ``(blocks, heads, block_size, content)`` views in one of its
    physical orders), checked against what the namespace was built from: the geometry of the
    KV cache spec and, on GPUs, the page order of the resolved ``KVCacheLayout``. Anything
    else is refused here, at start-up, naming the shape and strides."""
    t = tensors[0]
    try:
        kv_layout = KVLayout.from_engine_views(tensors)
    except ValueError as exc:
        raise ConfigError(
            f"meshkv connector: cannot move this engine's KV cache ({t.device}, layer tensor "
            f"{tuple(t.shape)} strides {t.stride()}, {t.dtype}): {exc}"
        ) from exc
    want = (layout.num_kv_heads, layout.block_size, 2 * layout.head_size)
    got = (kv_layout.num_kv_heads, kv_layout.block_size, kv_layout.head_size)
    if got != want and not (layout.mla and got == (1, layout.block_size, layout.head_size)):
        raise ConfigError(
            f"meshkv connector: the registered KV views (heads, block size, content) {got} "
            f"do not match the KV cache spec {want}"
        )
    if layout.page and kv_layout.page != layout.page:
        raise ConfigError(
            f"meshkv connector: the engine's KV views store a block as {kv_layout.page}, but "
            f"its KV cache layout says {layout.page}; the chunk namespace would be wrong"
        )
    return kv_layout


class DeviceCopies:
    """Ordering of the copies when the engine's caches are on a GPU.

    Saves: the gathers run on a side stream that first waits for the compute stream (the
    forward pass wrote the blocks), so the engine thread only enqueues them; an event after
    them is what the save thread waits on before it checksums and commits, and the compute
    stream waits on that event before its next step (``begin_saves``), so a block that
    vLLM reuses is never overwritten while it is still being read. Loads: the scatters run
    on the compute stream before the forward pass (``load``), or layer by layer on the load
    stream with an event per layer that the compute stream waits on just before that
    layer's attention (``load_layers``, ``wait``). Either way the engine thread never waits
    for a copy: the leased arena slots are released once the event after them has passed.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self.loads = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

    def _compute(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def begin_saves(self) -> None:
        self.side.wait_stream(self._compute())

    def saving(self) -> torch.cuda.StreamContext:
        return torch.cuda.stream(self.side)

    def end_saves(self) -> torch.cuda.Event:
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self.side)
        self._compute().wait_event(event)  # the next step's writes come after the reads
        return event

    def load(self, copy: Callable[[], None]) -> torch.cuda.Event:
        """``copy`` on the compute stream; the event after it."""
        copy()
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self._compute())
        return event

    def load_layers(
        self, prepare: Callable[[], Callable[[int], None]], layers: int
    ) -> list[torch.cuda.Event]:
        """On the load stream, after the work already on the compute stream (the blocks'
        previous users): ``prepare()`` (its device tensors then belong to this stream) and
        the copy of each layer, with the event after each."""
        self.loads.wait_stream(self._compute())
        events = []
        with torch.cuda.stream(self.loads):
            copy = prepare()
            for layer in range(layers):
                copy(layer)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(self.loads)
                events.append(event)
        return events

    def wait(self, event: torch.cuda.Event) -> None:
        """Work enqueued on the compute stream from now on runs after ``event``."""
        self._compute().wait_event(event)
