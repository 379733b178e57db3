"""Worker side of the meshkv connector: copy whole engine blocks to and from the arena.

Loads: synchronous loads run in ``start_load_kv`` before the forward pass (read/pin the
chunks, scatter arena → blocks, release). Asynchronous loads (chunks on SSD or a peer) run
on one background thread that waits up to ``load_timeout_s`` for the agent's pulls; the
request is reported through ``get_finished`` when its load ends either way. A chunk that
does not arrive, or arrives with the wrong size, is never copied: its blocks go to
``get_block_ids_with_load_errors`` and vLLM recomputes from the first of them.

Saves: ``wait_for_save`` makes one batched reserve for the step's new full chunks, gathers
engine blocks into the reserved slots and makes one batched commit. The copy is the only
work on the step's critical path; if the agent refuses (no space) or is down the chunks
are skipped and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from meshkv.chunk import ChunkKey
from meshkv.errors import MeshKVError, NoSpace
from meshkv.kernels import KVCaches, KVLayout, as_byte_tensor

from .config import ConnectorConfig
from .layout import EngineLayout
from .link import AgentLink
from .metadata import ChunkLoad, LoadSpec, MeshKVConnectorMetadata
from .stats import ConnectorCounters

if TYPE_CHECKING:
    from meshkv.client import Lease

logger = logging.getLogger(__name__)


class WorkerSide:
    """Implements the worker-role methods of ``MeshKVConnector``."""

    def __init__(
        self,
        cfg: ConnectorConfig,
        layout: EngineLayout,
        counters: ConnectorCounters,
        tp_rank: int,
    ) -> None:
        self._cfg = cfg
        self._layout = layout
        self._counters = counters
        self._rank = tp_rank
        self._blocks_per_chunk = cfg.chunk_tokens // layout.block_size
        self._link = AgentLink(
            cfg.socket_path,
            layout.namespace(tp_rank),
            cfg.save_timeout_s,
            cfg.retry_interval_s,
            counters,
        )
        # Async loads wait on the agent for up to load_timeout_s; their own client keeps
        # that wait from holding the lock that this step's saves need.
        self._async_link = AgentLink(
            cfg.socket_path,
            layout.namespace(tp_rank),
            cfg.save_timeout_s,
            cfg.retry_interval_s,
            counters,
        )
        self._caches: KVCaches | None = None
        self._chunk_bytes = 0
        self._lock = threading.Lock()
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()
        # One thread: async loads are rare and bounded by the number of waiting requests.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshkv-load")
        self._async: dict[str, tuple[Future[set[int]], LoadSpec]] = {}

    # --- registration ------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self._layout.layer_names if name not in kv_caches]
        if missing:
            raise MeshKVError(f"meshkv connector: vLLM registered no KV cache for {missing}")
        tensors = [kv_caches[name] for name in self._layout.layer_names]
        kv_layout = KVLayout.vllm_cpu(
            num_layers=len(tensors),
            num_kv_heads=self._layout.num_kv_heads,
            block_size=self._layout.block_size,
            head_size=self._layout.head_size,
            dtype=tensors[0].dtype,
        )
        self._caches = KVCaches(tensors, kv_layout)
        self._chunk_bytes = self._caches.chunk_nbytes(self._blocks_per_chunk)
        logger.info(
            "meshkv connector: %d layers, %d blocks, %d bytes per %d-token chunk, rank %d",
            len(tensors),
            self._caches.num_blocks,
            self._chunk_bytes,
            self._cfg.chunk_tokens,
            self._rank,
        )

    # --- loads -------------------------------------------------------------------------

    def start_load_kv(self, meta: MeshKVConnectorMetadata) -> None:
        for spec in meta.loads:
            if spec.is_async:
                self._async[spec.req_id] = (self._pool.submit(self._load, spec), spec)
            else:
                failed = self._load(spec)
                if failed:
                    with self._lock:
                        self._load_errors |= failed
                        self._failed_reqs.add(spec.req_id)

    def _load(self, spec: LoadSpec) -> set[int]:
        """Load one request's chunks; return the block ids that could not be loaded."""
        link = self._async_link if spec.is_async else self._link
        started = time.perf_counter()
        caches = self._caches
        keys = [chunk.keys[self._rank] for chunk in spec.chunks]
        wait = self._cfg.load_timeout_s if spec.is_async else 0.0
        failed: set[int] = set()
        try:
            if caches is None:
                raise MeshKVError("KV caches were never registered")
            leases = link.call(lambda client: client.read(keys, wait=wait))
        except MeshKVError as exc:
            logger.warning("meshkv load of %s failed: %s", spec.req_id, exc)
            self._counters.load_errors += len(spec.chunks)
            self._counters.call_seconds += time.perf_counter() - started
            return set(spec.block_ids())
        try:
            for chunk, lease in zip(spec.chunks, leases, strict=True):
                if failed or lease is None or lease.view.nbytes != self._chunk_bytes:
                    # Everything after the first missing chunk is recomputed anyway.
                    if lease is not None and lease.view.nbytes != self._chunk_bytes:
                        logger.warning(
                            "meshkv chunk %s has %d bytes, expected %d; recomputing",
                            lease.key.hex(),
                            lease.view.nbytes,
                            self._chunk_bytes,
                        )
                    self._counters.load_errors += 1
                    failed.update(block for _, block in chunk.blocks)
                    continue
                self._scatter(caches, chunk, lease)
                self._counters.loaded_chunks += 1
                self._counters.loaded_bytes += self._chunk_bytes
        finally:
            self._release(link, leases)
            self._counters.call_seconds += time.perf_counter() - started
        return failed

    def _scatter(self, caches: KVCaches, chunk: ChunkLoad, lease: Lease) -> None:
        src = as_byte_tensor(lease.view)
        offsets = [j for j, _ in chunk.blocks]
        block_ids = [block for _, block in chunk.blocks]
        if len(offsets) == self._blocks_per_chunk:
            caches.scatter(src, block_ids)
            return
        # vLLM already computed the first blocks of this chunk: copy only the rest.
        per_layer = src.view(len(self._layout.layer_names), self._blocks_per_chunk, -1)
        part = per_layer[:, offsets].contiguous().view(-1)
        caches.scatter(part, block_ids)

    @staticmethod
    def _release(link: AgentLink, leases: Sequence[Lease | None]) -> None:
        held = [lease for lease in leases if lease is not None]
        if not held:
            return
        try:
            link.call(lambda client: client.release(held))
        except MeshKVError as exc:
            # A dead connection releases its pins on the agent side; leases also expire.
            logger.debug("meshkv release failed: %s", exc)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Everything a step needs is loaded in ``start_load_kv``."""

    # --- saves -------------------------------------------------------------------------

    def wait_for_save(self, meta: MeshKVConnectorMetadata) -> None:
        caches = self._caches
        if not meta.saves or caches is None:
            return
        with self._lock:
            skip = set(self._failed_reqs)
        # A request whose load failed in this step holds blocks that are not valid yet.
        specs = [spec for spec in meta.saves if spec.req_id not in skip]
        chunks = [chunk for spec in specs for chunk in spec.chunks]
        if not chunks:
            return
        started = time.perf_counter()
        keys: list[ChunkKey] = [chunk.keys[self._rank] for chunk in chunks]
        sizes = [self._chunk_bytes] * len(keys)
        try:
            slots = self._link.call(lambda client: client.reserve(keys, sizes))
        except NoSpace:
            self._counters.save_skipped += len(keys)
            self._counters.call_seconds += time.perf_counter() - started
            return
        except MeshKVError as exc:
            logger.debug("meshkv save skipped: %s", exc)
            self._counters.save_skipped += len(keys)
            self._counters.call_seconds += time.perf_counter() - started
            return
        done: list[ChunkKey] = []
        try:
            for chunk, slot in zip(chunks, slots, strict=True):
                if slot is None:
                    self._counters.save_duplicates += 1
                    continue
                caches.gather(list(chunk.block_ids), as_byte_tensor(slot.view))
                done.append(slot.key)
        except BaseException:
            self._abort([s.key for s in slots if s is not None])
            self._counters.save_skipped += len(keys)
            raise
        if done:
            tokens = [self._cfg.chunk_tokens] * len(done)
            try:
                self._link.call(lambda client: client.commit(done, tokens))
                self._counters.saved_chunks += len(done)
                self._counters.saved_bytes += len(done) * self._chunk_bytes
            except MeshKVError as exc:
                logger.debug("meshkv commit failed: %s", exc)
                self._counters.save_skipped += len(done)
                self._abort(done)
        self._counters.call_seconds += time.perf_counter() - started

    def _abort(self, keys: list[ChunkKey]) -> None:
        if not keys:
            return
        try:
            self._link.call(lambda client: client.abort(keys))
        except MeshKVError as exc:
            logger.debug("meshkv abort failed: %s", exc)

    # --- completion --------------------------------------------------------------------

    def get_finished(self) -> set[str]:
        """Requests whose asynchronous load ended (successfully or not) since last call."""
        done = {req_id for req_id, (fut, _) in self._async.items() if fut.done()}
        for req_id in done:
            fut, spec = self._async.pop(req_id)
            try:
                failed = fut.result()
            except Exception:  # a bug in the load path must not take the engine down
                logger.exception("meshkv async load of %s crashed", req_id)
                failed = set(spec.block_ids())
                self._counters.load_errors += 1
            if failed:
                with self._lock:
                    self._load_errors |= failed
        return done

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
            self._failed_reqs.clear()
        return errors

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._link.close()
        self._async_link.close()
