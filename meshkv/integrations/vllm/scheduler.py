"""Scheduler side of the meshkv connector: lookups, load plans and save plans.

Per new request the scheduler computes the prompt's chunk keys and asks the agent once
which leading chunks it holds (the answer is cached per request id, since vLLM may ask
again). It promises whole chunks only, never the whole prompt, and less whatever vLLM's
own prefix cache already covers. Loads are synchronous when every promised chunk is in
the agent's CPU tier and asynchronous otherwise (SSD or peer: the agent starts pulling at
lookup time, the worker waits up to ``load_timeout_s`` off the step).

Tensor parallelism: keys are computed here for every rank's namespace and shipped to the
workers, which never hash tokens. The lookup asks with rank 0's keys only, assuming that
ranks save together; a rank missing its copy reports a load error and vLLM recomputes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from meshkv.chunk import ChunkKey, NamespaceId, chunk_keys
from meshkv.errors import AgentUnavailable, MeshKVError

from .config import ConnectorConfig
from .layout import EngineLayout
from .link import AgentLink
from .metadata import ChunkLoad, ChunkSave, LoadSpec, MeshKVConnectorMetadata, SaveSpec
from .stats import ConnectorCounters

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

_LOCAL_TIER = "cpu"
_MAX_NAMESPACE_CACHE = 1024


@dataclass(slots=True)
class _RequestState:
    """What the scheduler remembers about one live request."""

    request: Request
    keys: list[tuple[ChunkKey, ...]]
    """Prompt chunk keys, ``keys[i][rank]``."""
    hit_chunks: int = 0
    """Leading chunks the agent reported at lookup time."""
    all_local: bool = True
    """Whether every hit chunk was in the agent's CPU tier."""
    local_computed: int = 0
    """``num_computed_tokens`` vLLM passed in the last ``get_num_new_matched_tokens``."""
    saved_chunks: int = 0
    """Chunks already handed to the worker for saving (or skipped for good)."""
    pending_load: LoadSpec | None = None
    load_issued: bool = False
    """A load was planned once; vLLM asks again only after it failed (then: recompute)."""
    extra_keys: list[tuple[ChunkKey, ...]] = field(default_factory=list)
    """Keys of chunks filled during decoding (``save_decode_tokens``)."""


class SchedulerSide:
    """Implements the scheduler-role methods of ``MeshKVConnector``."""

    def __init__(
        self,
        cfg: ConnectorConfig,
        layout: EngineLayout,
        counters: ConnectorCounters,
        *,
        load_enabled: bool,
        save_enabled: bool,
    ) -> None:
        self._cfg = cfg
        self._layout = layout
        self._counters = counters
        self._load_enabled = load_enabled
        self._save_enabled = save_enabled
        self._blocks_per_chunk = cfg.chunk_tokens // layout.block_size
        self._link = AgentLink(
            cfg.socket_path,
            layout.namespace(0),
            cfg.lookup_timeout_s,
            cfg.retry_interval_s,
            counters,
        )
        self._requests: dict[str, _RequestState] = {}
        self._namespaces: dict[tuple[str, int], NamespaceId] = {}
        self._kv_cache_manager: KVCacheManager | None = None
        if load_enabled:
            self._link.warm_up()

    def bind_kv_cache_manager(self, manager: KVCacheManager) -> None:
        self._kv_cache_manager = manager

    # --- keys ----------------------------------------------------------------------------

    def _namespace_id(self, salt: str, rank: int) -> NamespaceId:
        cached = self._namespaces.get((salt, rank))
        if cached is None:
            if len(self._namespaces) >= _MAX_NAMESPACE_CACHE:
                self._namespaces.clear()
            ns = self._layout.namespace(rank)
            if salt:
                ns = replace(ns, cache_salt=ns.cache_salt + salt)
            cached = self._namespaces[(salt, rank)] = ns.digest()
        return cached

    @staticmethod
    def _request_salt(request: Request) -> str:
        parts = []
        if getattr(request, "cache_salt", None):
            parts.append(f"|salt:{request.cache_salt}")
        lora = getattr(request, "lora_request", None)
        if lora is not None:
            parts.append(f"|lora:{lora.lora_name}:{lora.lora_int_id}")
        return "".join(parts)

    def _keys_for(self, request: Request, tokens: list[int]) -> list[tuple[ChunkKey, ...]]:
        salt = self._request_salt(request)
        per_rank = [
            chunk_keys(self._namespace_id(salt, rank), tokens, self._cfg.chunk_tokens)
            for rank in range(self._layout.tp_size)
        ]
        return [tuple(rank_keys[i] for rank_keys in per_rank) for i in range(len(per_rank[0]))]

    def _state(self, request: Request) -> _RequestState:
        state = self._requests.get(request.request_id)
        if state is None:
            tokens = list(request.prompt_token_ids or [])
            state = _RequestState(request=request, keys=self._keys_for(request, tokens))
            self._requests[request.request_id] = state
            if self._load_enabled and state.keys:
                self._lookup(state)
        return state

    def _lookup(self, state: _RequestState) -> None:
        started = time.perf_counter()
        self._counters.lookups += 1
        rank0 = [keys[0] for keys in state.keys]
        try:
            reply = self._link.call(lambda client: client.lookup(rank0))
        except (AgentUnavailable, MeshKVError) as exc:
            self._counters.lookup_errors += 1
            logger.debug("meshkv lookup failed for %s: %s", state.request.request_id, exc)
            return
        finally:
            self._counters.call_seconds += time.perf_counter() - started
        prefix = min(int(reply.prefix), len(rank0))
        tiers = list(reply.tiers)[:prefix]
        state.hit_chunks = prefix
        state.all_local = all(tier == _LOCAL_TIER for tier in tiers)

    # --- vLLM hooks ----------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        state = self._state(request)  # a producer needs the keys to save, not a lookup
        state.local_computed = num_computed_tokens
        if not self._load_enabled:
            return 0, False
        if state.load_issued:
            # vLLM re-queries a request whose load failed (or that was preempted); a
            # second promise of the same chunks could fail the same way, forever. What
            # it computes again is saved again (this repairs a chunk that failed its check).
            state.saved_chunks = 0
            return 0, False
        prompt_len = len(request.prompt_token_ids or [])
        chunk = self._cfg.chunk_tokens
        # Leave at least one prompt token to compute: vLLM needs its logits.
        usable_chunks = min(state.hit_chunks, max(0, (prompt_len - 1) // chunk))
        hit_tokens = usable_chunks * chunk
        if hit_tokens <= num_computed_tokens:
            return 0, False
        new_tokens = hit_tokens - num_computed_tokens
        return new_tokens, not state.all_local

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0:
            return
        state = self._requests.get(request.request_id)
        if state is None:
            return
        (block_ids,) = blocks.get_block_ids()
        bs = self._layout.block_size
        first_block = state.local_computed // bs
        end_block = (state.local_computed + num_external_tokens) // bs
        loads: list[ChunkLoad] = []
        for c in range(first_block // self._blocks_per_chunk, len(state.keys)):
            writes = tuple(
                (j, block_ids[c * self._blocks_per_chunk + j])
                for j in range(self._blocks_per_chunk)
                if first_block <= c * self._blocks_per_chunk + j < end_block
            )
            if not writes:
                break
            loads.append(ChunkLoad(keys=state.keys[c], blocks=writes))
        is_async = not state.all_local
        state.load_issued = True
        # The promised chunks are in the agent already: saving them again would cost a
        # reserve round-trip (answered "exists") on the engine's critical path every step.
        loaded_chunks = (state.local_computed + num_external_tokens) // self._cfg.chunk_tokens
        state.saved_chunks = max(state.saved_chunks, min(state.hit_chunks, loaded_chunks))
        state.pending_load = LoadSpec(request.request_id, tuple(loads), is_async)
        self._counters.hit_tokens += num_external_tokens
        if is_async:
            self._counters.async_loads += 1

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> MeshKVConnectorMetadata:
        meta = MeshKVConnectorMetadata(chunk_tokens=self._cfg.chunk_tokens)
        for state in self._requests.values():
            if state.pending_load is not None:
                meta.loads.append(state.pending_load)
                state.pending_load = None
        if not self._save_enabled:
            return meta
        loading = {spec.req_id for spec in meta.loads if spec.is_async}
        for new_req in scheduler_output.scheduled_new_reqs:
            self._plan_save(
                meta, new_req.req_id, new_req.num_computed_tokens, scheduler_output, loading
            )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            self._plan_save(meta, req_id, cached.num_computed_tokens[i], scheduler_output, loading)
        return meta

    def _plan_save(
        self,
        meta: MeshKVConnectorMetadata,
        req_id: str,
        num_computed: int,
        scheduler_output: SchedulerOutput,
        skip: set[str],
    ) -> None:
        state = self._requests.get(req_id)
        if state is None or req_id in skip or self._kv_cache_manager is None:
            return
        done_tokens = num_computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
        chunk = self._cfg.chunk_tokens
        full_chunks = done_tokens // chunk
        keys = state.keys
        if full_chunks > len(keys):
            if not self._cfg.save_decode_tokens:
                full_chunks = len(keys)
            else:
                keys = self._decode_keys(state, full_chunks)
        if full_chunks <= state.saved_chunks:
            return
        (block_ids,) = self._kv_cache_manager.get_block_ids(req_id)
        bpc = self._blocks_per_chunk
        saves = []
        for c in range(state.saved_chunks, min(full_chunks, len(keys))):
            blocks = block_ids[c * bpc : (c + 1) * bpc]
            if len(blocks) < bpc:
                break
            saves.append(ChunkSave(keys=keys[c], block_ids=tuple(blocks), index=c))
        if saves:
            meta.saves.append(SaveSpec(req_id, tuple(saves)))
            state.saved_chunks = saves[-1].index + 1

    def _decode_keys(self, state: _RequestState, full_chunks: int) -> list[tuple[ChunkKey, ...]]:
        tokens = list(state.request.all_token_ids[: full_chunks * self._cfg.chunk_tokens])
        if len(state.keys) + len(state.extra_keys) < full_chunks:
            all_keys = self._keys_for(state.request, tokens)
            state.extra_keys = all_keys[len(state.keys) :]
        return state.keys + state.extra_keys

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        # Saves run to completion inside the step that computed the chunk (wait_for_save),
        # so no block of a finished request is still being read: free them now.
        self._requests.pop(request.request_id, None)
        return False, None

    def close(self) -> None:
        self._requests.clear()
        self._link.close()
