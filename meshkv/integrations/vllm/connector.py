"""``MeshKVConnector``: vLLM's ``KVConnectorBase_V1`` for meshkv, delegating by role.

vLLM builds one instance in the scheduler process (role SCHEDULER) and one per worker
(role WORKER). The scheduler half lives in ``scheduler.py``, the worker half in
``worker.py``; this class only checks the configuration, builds the right half and
forwards vLLM's calls. ``kv_role`` decides what runs: ``kv_both`` loads and saves,
``kv_producer`` (prefill) only saves, ``kv_consumer`` (decode) only loads.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from meshkv.errors import ConfigError

from .config import ConnectorConfig, check_vllm_version
from .events import EventLog, SavedChunks, publishes_kv_events
from .layout import eagle_block_drop, engine_layout
from .link import SchedulerLink, WorkerLink
from .logs import share_vllm_logging
from .metadata import MeshKVConnectorMetadata
from .scheduler import SchedulerSide
from .stats import (
    MeshKVConnectorStats,
    MeshKVPromMetrics,
    delta,
    new_counters,
    note_namespace,
    retire,
)
from .worker import WorkerSide

if TYPE_CHECKING:
    import torch
    from vllm.attention.backends.abstract import AttentionMetadata
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent, KVConnectorKVEvents
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

try:  # vLLM 0.32 counts connector hits by source; an older one has no such module, and
    # the import must not fail before the version check can say so clearly.
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    HOST_HIT_SOURCE: Any = CacheHitSource.HOST
except ImportError:
    HOST_HIT_SOURCE = None


def off_step_reason(vllm_config: VllmConfig) -> str | None:
    """Why this engine must load every hit off the step (None: it may load in the step).

    A failed in-step load makes vLLM roll back a *running* request, and two parts of vLLM
    0.32 get that wrong (vllm#49250): the async scheduler leaves the request's output
    placeholder (the recomputation feeds an invalid token id: the engine dies, as
    ``tests/vllm/test_async_scheduling.py`` showed with in-step loads), and model runner
    V2 — GPU engines' default — moves only its CPU copy of ``num_computed_tokens`` back,
    so the recomputation reads tokens and positions from the wrong offset (wrong output;
    read in vLLM's code, not run: V2 needs Triton on a GPU). A request that loads off the
    step is not running yet, and a failure rolls it back cleanly in both."""
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        return "async scheduling"
    if getattr(vllm_config, "use_v2_model_runner", False):
        return "model runner V2"
    return None


class MeshKVConnector(KVConnectorBase_V1):
    """KV connector that stores and loads prompt chunks through the local meshkv agent."""

    if HOST_HIT_SOURCE is not None:
        _cache_hit_source = HOST_HIT_SOURCE

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        share_vllm_logging()
        transfer = self._kv_transfer_config
        # The connector is this process's edge into meshkv: the environment is read here.
        self._cfg = ConnectorConfig.from_extra_config(
            transfer.kv_connector_extra_config, os.environ
        )
        check_vllm_version(str(vllm.__version__), self._cfg.allow_untested_vllm)
        if transfer.kv_load_failure_policy != "recompute":
            raise ConfigError(
                "meshkv connector needs kv_transfer_config "
                '{"kv_load_failure_policy": "recompute"}: a chunk that fails to load '
                "(evicted, corrupt, agent gone) must be recomputed, not fail the request"
            )
        self._layout = engine_layout(vllm_config, kv_cache_config, self._cfg)
        self._holder = new_counters()
        self._counters = self._holder.counters
        self._reported: dict[str, float] = self._counters.as_dict()
        note_namespace(role.name.lower(), asdict(self._layout.namespace(0)))
        off_step = off_step_reason(vllm_config)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            link = SchedulerLink(self._cfg, self._layout.namespace(0), self._counters)
            # Connect at engine start, so the first lookup does not pay for the connect
            # inside its deadline (a missing agent is only logged, like any later outage).
            link.warm_up()
            self._scheduler = SchedulerSide(
                self._cfg,
                self._layout,
                self._counters,
                link,
                load_enabled=transfer.is_kv_consumer,
                save_enabled=transfer.is_kv_producer,
                events=EventLog(vllm_config.parallel_config.tensor_parallel_size)
                if publishes_kv_events(vllm_config)
                else None,
                in_step_loads=off_step is None,
                drop_last_block=eagle_block_drop(vllm_config),
            )
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
            self._worker = WorkerSide(
                self._cfg,
                self._layout,
                self._counters,
                rank,
                WorkerLink(self._cfg, self._layout.namespace(rank), self._counters),
            )
            self._worker.report_saves = publishes_kv_events(vllm_config)
        logger.info(
            "meshkv connector (%s, %s) for %s: %s, chunk %d tokens, agent %s, loads %s",
            role.name.lower(),
            transfer.kv_role,
            self._layout.model,
            self._layout.packing,
            self._cfg.chunk_tokens,
            self._cfg.socket_path,
            "in the step" if off_step is None else f"off the step ({off_step})",
        )

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a dropped save is a future miss, never a correctness issue.
        return False

    def _sched(self) -> SchedulerSide:
        assert self._scheduler is not None, "scheduler-side call on a worker connector"
        return self._scheduler

    def _work(self) -> WorkerSide:
        assert self._worker is not None, "worker-side call on a scheduler connector"
        return self._worker

    def _meta(self) -> MeshKVConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, MeshKVConnectorMetadata)
        return meta

    # --- worker side -------------------------------------------------------------------

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None and isinstance(connector_metadata, MeshKVConnectorMetadata):
            self._worker.prepare(connector_metadata)  # before the forward pass: start saves

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._work().register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._work().start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._work().wait_for_layer_load(layer_name)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Saves are whole chunks of every layer, done once per step in ``wait_for_save``."""

    def wait_for_save(self) -> None:
        if self.has_connector_metadata():
            self._work().wait_for_save(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        recving = self._work().get_finished()
        return None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._work().get_block_ids_with_load_errors()

    def get_kv_connector_kv_cache_events(self) -> KVConnectorKVEvents | None:
        """Chunks this worker's agent committed (for vLLM's KV events; see events.py)."""
        return self._work().take_saved()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        now = self._counters.as_dict()
        changes = delta(now, self._reported)
        self._reported = now
        return MeshKVConnectorStats(data=changes) if changes else None

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """``layer_loads`` needs vLLM's per-layer ``wait_for_layer_load`` calls, which a
        full CUDA graph would skip on replay: vLLM then captures piecewise graphs only."""
        return ConnectorConfig.from_extra_config(extra_config, os.environ).layer_loads

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return MeshKVConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> MeshKVPromMetrics:
        """The connector's counters on the API server's ``/metrics`` (``vllm:meshkv_*``)."""
        return MeshKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()
        retire(self._holder)

    # --- scheduler side ----------------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self._sched().bind_kv_cache_manager(kv_cache_manager)

    def on_new_request(self, request: Request) -> None:
        self._sched().on_new_request(request)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        started = time.perf_counter()
        try:
            return self._sched().get_num_new_matched_tokens(request, num_computed_tokens)
        finally:
            self._counters.call_seconds += time.perf_counter() - started

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._sched().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._sched().build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        sched = self._sched()
        failed = getattr(connector_output, "failed_recving", None) or ()
        invalid = connector_output.invalid_block_ids or set()
        if failed or invalid:
            sched.load_failures(failed, invalid)
        events = sched.events
        saved = connector_output.kv_cache_events
        if events is not None and isinstance(saved, SavedChunks):
            events.confirm(saved)

    def has_pending_push_work(self) -> bool:
        """True while a saved chunk's commit is still to be reported (with KV events on):
        vLLM then keeps stepping an idle engine, so the chunk's event is published now,
        not when the next request comes (``EventLog.awaiting``)."""
        events = self._sched().events
        return events is not None and events.awaiting()

    def take_events(self) -> Iterable[KVCacheEvent]:
        """``BlockStored`` events (medium ``CPU``, ownership ``meshkv``) of the chunks the
        agent confirmed since the last call; vLLM publishes them with its own."""
        events = self._sched().events
        return events.take() if events is not None else ()

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().request_finished(request, block_ids)
