"""Scheduler side of the meshkv connector: lookups, load plans, save plans, P/D parameters.

Per new request the scheduler computes the prompt's chunk keys and asks the agent once
which leading chunks it holds (the answer is cached per request id, since vLLM may ask
again). It promises whole chunks only, never the whole prompt, and less whatever vLLM's
own prefix cache already covers. Loads are synchronous when every promised chunk is in the
agent's CPU tier and asynchronous otherwise (SSD or peer: the agent starts pulling at
lookup time, the worker waits up to ``load_timeout_s`` off the step).

Prefill/decode (``transfer.py`` has the parameters):

* **Prefill** (``do_remote_decode``): every prompt token is saved, the last partial chunk
  too (its key is the prompt's chained key over the partial tokens, so no other prompt can
  meet it); once the whole prompt is saved the worker asks the agent to hold the chunks for
  the transfer (and push them to the decode node the proxy named). ``request_finished``
  returns the parameters the decode engine needs. The blocks are freed at once: the bytes
  were copied into the agent's arena in the step that computed them.
* **Decode** (``do_remote_prefill`` with meshkv parameters): the whole prompt is promised
  as an asynchronous load from the named producer (vLLM recomputes the last token so that
  it can sample); the request waits while the engine schedules others; whatever does not
  arrive by ``transfer_timeout_s`` is recomputed. Until vLLM first looks at the request
  (it does not while every running slot is taken), the producer's hold is renewed every
  ``transfer_renew_s``; a request that ends before that releases the hold at once.

Tensor parallelism: keys are computed here for every rank's namespace and shipped to the
workers, which never hash tokens. The lookup asks with rank 0's keys only, assuming that
ranks save together; a rank missing its copy reports a load error and vLLM recomputes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from meshkv.chunk import ROOT_KEY, ChunkKey, NamespaceId, chunk_keys, next_key
from meshkv.client import LookupReply, TransferRef
from meshkv.errors import AgentUnavailable, MeshKVError

from .config import ConnectorConfig
from .content import content_extras
from .events import EventLog, chunk_event
from .layout import EngineLayout
from .metadata import ChunkLoad, ChunkSave, HoldSpec, LoadSpec, MeshKVConnectorMetadata, SaveSpec
from .renewals import QueuedTransfers, TransferAgent
from .stats import ConnectorCounters
from .transfer import (
    ConsumerRequest,
    ProducerRequest,
    engine_differences,
    engine_fields,
    identity_params,
    parse_consumer,
    parse_producer,
    producer_params,
    wants_identity,
)

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

MISMATCH_WARN_S = 60.0
"""A decode engine warns about a mismatched prefill engine at most this often (per
producer and difference); the counter counts every request."""

_MEMORY_TIER = "cpu"
_SSD_TIER = "ssd"
MAX_RELOADS = 2
"""Fresh lookups a request may make after vLLM preempted it (each one after a load that
did not fail): its KV is still in the agent, so it is loaded again instead of computed."""
_MAX_NAMESPACE_CACHE = 1024


class SchedulerAgent(TransferAgent, Protocol):
    """What the scheduler side needs of its agent link (``link.AgentLink`` in an engine, a
    fake in unit tests); ``transfers`` renews and abandons queued requests' holds."""

    def lookup(
        self,
        keys: list[ChunkKey],
        transfer: TransferRef | None,
        *,
        probe: bool = False,
        ranks: Sequence[tuple[NamespaceId, list[ChunkKey]]] = (),
    ) -> LookupReply:
        """``keys`` are rank 0's; ``ranks`` the other tensor-parallel ranks' namespace ids
        and keys for the same positions."""
        ...

    def node_id(self) -> str | None:
        """The agent's node id (None while it cannot be reached)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Chunk:
    """One chunk of a prompt as the connector plans it."""

    keys: tuple[ChunkKey, ...]
    """Its key per TP rank."""
    num_tokens: int
    num_blocks: int
    """Engine blocks it holds (a partial last chunk holds fewer than a full one)."""


@dataclass(slots=True)
class _RequestState:
    """What the scheduler remembers about one live request."""

    request: Request
    keys: list[tuple[ChunkKey, ...]]
    """Keys of the prompt's full chunks, ``keys[i][rank]``."""
    tail: _Chunk | None = None
    """The prompt's last, partial chunk: kept for prefill/decode transfers only (its key
    chains over the partial tokens, so no other prompt can ever meet it)."""
    hit_chunks: int = 0
    """Leading chunks (of ``chunks()``) the agent reported at lookup time."""
    all_local: bool = True
    """Whether every hit chunk can be loaded inside the step: in the agent's CPU tier, or
    on its SSD (``ssd_sync_wait_s``)."""
    ssd_hit: bool = False
    """Whether a hit chunk was on the agent's SSD (the step waits for its promotion)."""
    local_computed: int = 0
    """``num_computed_tokens`` vLLM passed in the last ``get_num_new_matched_tokens``."""
    saved_chunks: int = 0
    """Full chunks already handed to the worker for saving (or skipped for good)."""
    tail_saved: bool = False
    block_tail: _Chunk | None = None
    """``block_hits``: the prompt's last partial chunk cut to whole blocks, saved so that a
    longer prompt with the same start (the next turn, a question about the same document)
    hits every full block of it, as vLLM's own prefix cache would."""
    block_tail_saved: bool = False
    hit_tail: _Chunk | None = None
    """``block_hits``: a partial chunk found right after the last whole-chunk hit."""
    pending_load: LoadSpec | None = None
    load_issued: bool = False
    """A load was planned; vLLM asks again after it failed (then: recompute) or after it
    preempted the request (then: look up again, see ``MAX_RELOADS``)."""
    load_blocks: frozenset[int] = frozenset()
    """Engine blocks the last load wrote (to match vLLM's ``invalid_block_ids``)."""
    load_failed: bool = False
    """vLLM reported a block of the last load, or the request, as failed to load."""
    preemptions_at_load: int = 0
    """vLLM's ``num_preemptions`` of the request when the last load was planned."""
    saves_at_load: tuple[int, bool, bool, bool] | None = None
    """``saved_chunks``, ``tail_saved``, ``block_tail_saved`` and ``held`` before the last
    load was planned: a failed load puts them back (``load_failures``)."""
    reloads: int = 0
    extra_keys: list[tuple[ChunkKey, ...]] = field(default_factory=list)
    """Keys of chunks filled during decoding (``save_decode_tokens``)."""
    producer: ProducerRequest | None = None
    """Prefill side of a transfer: save the whole prompt, hold it for the decode engine."""
    transfer_id: str | None = None
    held: bool = False
    """The hold was planned (the whole prompt is saved)."""
    consumer: ConsumerRequest | None = None
    """Decode side of a transfer (its chunks come from ``consumer.producer``)."""

    def chunks(self, chunk_tokens: int, blocks_per_chunk: int) -> list[_Chunk]:
        """The chunks a load or a hold covers: the full ones, then the tail."""
        out = [_Chunk(k, chunk_tokens, blocks_per_chunk) for k in self.keys]
        if self.tail is not None:
            out.append(self.tail)
        return out

    def load_chunks(self, chunk_tokens: int, blocks_per_chunk: int) -> list[_Chunk]:
        """The chunks a load may cover: ``chunks()``, or with a partial hit the whole-chunk
        hits followed by it."""
        if self.hit_tail is None:
            return self.chunks(chunk_tokens, blocks_per_chunk)
        head = self.keys[: self.hit_chunks]
        return [_Chunk(k, chunk_tokens, blocks_per_chunk) for k in head] + [self.hit_tail]


class SchedulerSide:
    """Implements the scheduler-role methods of ``MeshKVConnector``."""

    def __init__(
        self,
        cfg: ConnectorConfig,
        layout: EngineLayout,
        counters: ConnectorCounters,
        agent: SchedulerAgent,
        *,
        load_enabled: bool,
        save_enabled: bool,
        events: EventLog | None = None,
        in_step_loads: bool = True,
        drop_last_block: bool = False,
    ) -> None:
        self._cfg = cfg
        self._drop_last_block = drop_last_block
        """An EAGLE drafter reads the token after each position, so its KV at a hit's last
        position belongs to whatever followed it when it was computed: as vLLM's prefix
        cache does for EAGLE (``use_eagle_block_drop``), a hit leaves its last block to
        compute."""
        self._in_step_loads = in_step_loads
        """Whether loads may run inside the step: not where vLLM cannot roll back a
        running request whose load failed (async scheduling, model runner V2; see
        ``connector.off_step_reason``). A request loading off the step waits in
        WAITING_FOR_REMOTE_KVS, unscheduled, and its failure rolls back cleanly."""
        self.events = events
        """vLLM KV events of confirmed saves (None: the engine publishes no KV events)."""
        self._layout = layout
        self._counters = counters
        self._agent = agent
        self._load_enabled = load_enabled
        self._save_enabled = save_enabled
        self._blocks_per_chunk = cfg.chunk_tokens // layout.block_size
        # block_hits cuts hold at least half a chunk: the agent stores them in whole-chunk
        # slots when it has no smaller ones (at most twice their size), so they never make
        # it empty an arena segment for a class of their own.
        self._min_cut_blocks = max(1, -(-self._blocks_per_chunk // 2))
        self._requests: dict[str, _RequestState] = {}
        self._namespaces: dict[tuple[str, int], NamespaceId] = {}
        self._engine = engine_fields(asdict(layout.namespace(0)))
        """This engine's namespace fields, as a producer sends them in its params."""
        self._mismatch_warned: dict[tuple[str, ...], float] = {}
        self._kv_cache_manager: KVCacheManager | None = None
        self._queued = QueuedTransfers(agent, counters, cfg.transfer_renew_s)
        """Decode requests not looked up yet: their holds are renewed."""

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

    def _other_ranks(self, chunks: Sequence[_Chunk]) -> list[tuple[NamespaceId, list[ChunkKey]]]:
        """The keys of tensor-parallel ranks 1.. for a lookup of ``chunks``, each with the
        namespace its worker stores under (the agent checks every rank's chunks, since one
        rank without its chunk fails the whole load)."""
        return [
            (self._rank_namespace(rank), [c.keys[rank] for c in chunks])
            for rank in range(1, self._layout.tp_size)
        ]

    def _rank_namespace(self, rank: int) -> NamespaceId:
        """The namespace rank ``rank``'s worker says hello with: its chunks are stored
        under it (a request's salt is in its keys, not here)."""
        return self._namespace_id("", rank)

    @staticmethod
    def _request_salt(request: Request) -> str:
        parts = []
        if getattr(request, "cache_salt", None):
            parts.append(f"|salt:{request.cache_salt}")
        lora = getattr(request, "lora_request", None)
        if lora is not None:
            parts.append(f"|lora:{lora.lora_name}:{lora.lora_int_id}")
        return "".join(parts)

    def _keys_for(
        self, request: Request, tokens: list[int], *, partial: bool = False
    ) -> list[tuple[ChunkKey, ...]]:
        salt = self._request_salt(request)
        chunk = self._cfg.chunk_tokens
        n = len(tokens)
        extras = content_extras(request, [(at, min(at + chunk, n)) for at in range(0, n, chunk)])
        per_rank = [
            chunk_keys(
                self._namespace_id(salt, rank), tokens, chunk, include_partial=partial,
                extras=extras,
            )
            for rank in range(self._layout.tp_size)
        ]  # fmt: skip
        return [tuple(rank_keys[i] for rank_keys in per_rank) for i in range(len(per_rank[0]))]

    def _state(self, request: Request) -> _RequestState:
        state = self._requests.get(request.request_id)
        if state is not None:
            return state
        tokens = list(request.prompt_token_ids or [])
        params = getattr(request, "kv_transfer_params", None)
        producer = parse_producer(params) if self._save_enabled else None
        consumer = parse_consumer(params) if self._load_enabled else None
        if consumer is not None and not self._consumer_usable(consumer, len(tokens)):
            consumer = None
        state = _RequestState(request=request, keys=self._keys_for(request, tokens))
        if producer is not None or consumer is not None:
            state.tail = self._tail(request, tokens)
        last = state.tail.keys if state.tail is not None else (state.keys or [()])[-1]
        if consumer is not None and (not last or last[0] != consumer.last_key):
            # Another prompt than the producer saw (a different template, truncation...),
            # or another engine's KV (a misconfigured pair): its chunks cannot be this
            # request's KV. Look it up like any other request.
            self._ignore_transfer(consumer)
            consumer = None
            if producer is None:
                state.tail = None
        state.producer, state.consumer = producer, consumer
        # vLLM looks at the request: its lookup (below) starts the transfer's pulls and the
        # agent tells the producer when they end; an unused transfer is abandoned now.
        self._queued.looked_at(request.request_id, used=consumer is not None)
        if producer is not None:
            state.transfer_id = uuid.uuid4().hex
        elif consumer is None and self._cfg.block_hits and self._save_enabled:
            rest = len(tokens) - len(state.keys) * self._cfg.chunk_tokens
            blocks = rest // self._layout.block_size
            if blocks >= self._min_cut_blocks:
                (state.block_tail,) = self._partials(state, len(state.keys), [blocks])
        self._requests[request.request_id] = state
        self._lookup_if_reads(state)
        return state

    def _lookup_if_reads(self, state: _RequestState, *, transfer: bool = True) -> None:
        # A request that reads no cache (vLLM sets this for prompt logprobs, which need
        # the logits of every prompt token) is computed whole; vLLM ignores any hit we
        # report, so asking the agent would only cost a round trip and start pulls for
        # nothing. A transfer's consumer still asks: the lookup ends the producer's hold.
        request = state.request
        reads = state.consumer is not None or not getattr(
            request, "skip_reading_prefix_cache", False
        )
        if self._load_enabled and reads and (state.keys or state.tail is not None):
            self._lookup(state, transfer=transfer)

    def _reload(self, state: _RequestState) -> bool:
        """vLLM asks again about a request whose load was planned: True (and a fresh
        lookup done) if it was preempted since and the load did not fail, so its KV, still
        in the agent, can be loaded again. A transfer's consumer (a decode engine's request)
        looks its chunks up in the agent like any request: the transfer brought them there,
        and its producer's hold may be over."""
        preemptions = int(getattr(state.request, "num_preemptions", 0) or 0)
        if (
            state.load_failed
            or preemptions <= state.preemptions_at_load
            or state.reloads >= MAX_RELOADS
        ):
            return False
        state.reloads += 1
        self._counters.reloads += 1
        logger.debug("meshkv: %s was preempted; looking it up again", state.request.request_id)
        state.load_issued = False
        state.hit_chunks, state.hit_tail, state.all_local, state.ssd_hit = 0, None, True, False
        state.load_blocks = frozenset()
        self._lookup_if_reads(state, transfer=False)
        return True

    def _tail(self, request: Request, tokens: list[int]) -> _Chunk | None:
        chunk, bs = self._cfg.chunk_tokens, self._layout.block_size
        rest = len(tokens) % chunk
        if rest == 0:
            return None
        keys = self._keys_for(request, tokens, partial=True)[-1]
        return _Chunk(keys, rest, -(-rest // bs))

    def _partials(self, state: _RequestState, position: int, counts: Iterable[int]) -> list[_Chunk]:
        """Chunk ``position`` of the prompt cut to each of ``counts`` blocks, each a chunk of
        its own (chained like a full one, so it can only meet the same prompt start)."""
        chunk, bs = self._cfg.chunk_tokens, self._layout.block_size
        start = position * chunk
        tokens = state.request.prompt_token_ids or []
        salt = self._request_salt(state.request)
        parents = state.keys[position - 1] if position else (ROOT_KEY,) * self._layout.tp_size
        ranks = [(self._namespace_id(salt, r), parents[r]) for r in range(self._layout.tp_size)]
        out = []
        for n in counts:
            cut = tokens[start : start + n * bs]
            extra = content_extras(state.request, [(start, start + len(cut))]).get(0, b"")
            keys = tuple(next_key(ns, prev, cut, extra) for ns, prev in ranks)
            out.append(_Chunk(keys, n * bs, n))
        return out

    def _probe_partial(self, state: _RequestState, position: int) -> None:
        """``block_hits``: after ``position`` whole-chunk hits, ask for the same chunk cut at
        each block (longest first, down to half a chunk): another prompt that ended inside
        it saved its whole blocks there. One more round trip, only for requests that hit
        something."""
        bs, chunk = self._layout.block_size, self._cfg.chunk_tokens
        prompt_len = len(state.request.prompt_token_ids or [])
        # Leave at least one prompt token to compute: vLLM needs its logits.
        most = min(self._blocks_per_chunk - 1, (prompt_len - 1 - position * chunk) // bs)
        if most < self._min_cut_blocks:
            return
        candidates = self._partials(state, position, range(most, self._min_cut_blocks - 1, -1))
        reply = self._ask(
            state, [c.keys[0] for c in candidates], None, probe=True,
            ranks=self._other_ranks(candidates),
        )  # fmt: skip
        if reply is None:
            return
        for candidate, tier in zip(candidates, reply.tiers, strict=False):
            if tier is not None:
                state.hit_tail = candidate
                self._note_tiers(state, [tier])
                return

    def _ask(
        self,
        state: _RequestState,
        keys: list[ChunkKey],
        ref: TransferRef | None,
        *,
        probe: bool = False,
        ranks: Sequence[tuple[NamespaceId, list[ChunkKey]]] = (),
    ) -> LookupReply | None:
        """One lookup round trip, timed and counted; None when the agent did not answer."""
        started = time.perf_counter()
        try:
            return self._agent.lookup(keys, ref, probe=probe, ranks=ranks)
        except (AgentUnavailable, MeshKVError) as exc:
            self._counters.lookup_errors += 1
            logger.debug("meshkv lookup failed for %s: %s", state.request.request_id, exc)
            return None
        finally:
            self._counters.call_seconds += time.perf_counter() - started

    def _note_tiers(self, state: _RequestState, tiers: Iterable[str | None]) -> None:
        """Fold the tiers of hit chunks into whether the load can run inside the step."""
        for tier in tiers:
            if tier == _SSD_TIER and self._cfg.ssd_sync_wait_s > 0:
                state.ssd_hit = True
            elif tier != _MEMORY_TIER:
                state.all_local = False

    def _ignore_transfer(self, consumer: ConsumerRequest) -> None:
        differences = engine_differences(consumer.engine, self._engine) if consumer.engine else []
        if not differences:
            logger.info("meshkv transfer %s: prompt differs from the prefill's; ignoring it",
                        consumer.transfer_id)  # fmt: skip
            return
        # A configuration error, not a request's: every transfer from that engine is lost.
        self._counters.transfer_mismatches += 1
        now = time.monotonic()
        signature = (consumer.producer, *differences)
        if now - self._mismatch_warned.get(signature, -MISMATCH_WARN_S) < MISMATCH_WARN_S:
            return
        if len(self._mismatch_warned) >= 64:
            self._mismatch_warned.clear()
        self._mismatch_warned[signature] = now
        logger.warning(
            "meshkv transfer from prefill node %s: that engine's KV is not this engine's "
            "(%s), so every prompt it prefills for this engine is computed here again. Run "
            "both with the same model (or the same kv_connector_extra_config model_id), "
            "dtype, KV cache dtype, block size, tensor-parallel size and drafter "
            "(draft_model_id); counted in meshkv_transfer_mismatches",
            consumer.producer, "; ".join(differences),
        )  # fmt: skip

    def _consumer_usable(self, consumer: ConsumerRequest, prompt_len: int) -> bool:
        if consumer.chunk_tokens != self._cfg.chunk_tokens:
            logger.warning(
                "meshkv transfer %s was saved with %d-token chunks, this engine uses %d; "
                "computing the prompt here", consumer.transfer_id, consumer.chunk_tokens,
                self._cfg.chunk_tokens,
            )  # fmt: skip
            return False
        return consumer.tokens == prompt_len

    def _lookup(self, state: _RequestState, *, transfer: bool = True) -> None:
        """Ask the agent which of the prompt's chunks it can serve (for a transfer's
        consumer, with the transfer named unless ``transfer`` is False)."""
        self._counters.lookups += 1
        chunks = state.chunks(self._cfg.chunk_tokens, self._blocks_per_chunk)
        rank0 = [c.keys[0] for c in chunks]
        ref = None
        if state.consumer is not None and transfer:
            c = state.consumer
            ref = TransferRef(c.transfer_id, c.producer, self._cfg.transfer_timeout_s)
        reply = self._ask(state, rank0, ref, ranks=self._other_ranks(chunks))
        if reply is None:
            return
        prefix = min(int(reply.prefix), len(rank0))
        if self.events is not None and prefix < len(rank0):
            found = list(reply.tiers)
            self.events.gone(
                key
                for i, key in enumerate(rank0)
                if i >= prefix and i < len(found) and found[i] is None
            )
        tiers = list(reply.tiers)[:prefix]
        if self.events is not None:
            for key, tier in zip(rank0, tiers, strict=False):
                self.events.seen(key, tier)
        state.hit_chunks = prefix
        state.all_local, state.ssd_hit = True, False
        self._note_tiers(state, tiers)
        if (
            prefix > 0
            and self._cfg.block_hits
            and state.consumer is None
            and state.producer is None
            and prefix <= len(state.keys)
        ):
            self._probe_partial(state, prefix)

    # --- vLLM hooks ----------------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        """A request entered the engine's queue: a decode request's transfer is renewed
        at its producer until vLLM looks at the request."""
        if not self._load_enabled:
            return
        consumer = parse_consumer(getattr(request, "kv_transfer_params", None))
        if consumer is None:
            return
        self._queued.add(request.request_id, consumer)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        state = self._state(request)  # a producer needs the keys to save, not a lookup
        state.local_computed = num_computed_tokens
        if not self._load_enabled:
            return 0, False
        if state.load_issued and not self._reload(state):
            # vLLM re-queries a request whose load failed; a second promise of the same
            # chunks could fail the same way, forever. What it computes again is saved
            # again.
            state.saved_chunks = 0
            state.block_tail_saved = False
            return 0, False
        prompt_len = len(request.prompt_token_ids or [])
        if state.consumer is not None:
            # The whole prompt comes from the transfer (vLLM recomputes its last token so
            # that it can sample the next).
            chunks = state.chunks(self._cfg.chunk_tokens, self._blocks_per_chunk)
            hit_tokens = sum(c.num_tokens for c in chunks[: state.hit_chunks])
            if hit_tokens <= num_computed_tokens:
                return 0, False
            return hit_tokens - num_computed_tokens, True
        chunk = self._cfg.chunk_tokens
        # Leave at least one prompt token to compute: vLLM needs its logits.
        usable_chunks = min(state.hit_chunks, max(0, (prompt_len - 1) // chunk))
        hit_tokens = usable_chunks * chunk
        if state.hit_tail is not None and usable_chunks == state.hit_chunks:
            hit_tokens += state.hit_tail.num_tokens  # probed to leave one token to compute
        if self._drop_last_block and hit_tokens > 0:
            hit_tokens -= self._layout.block_size
        if hit_tokens <= num_computed_tokens:
            return 0, False
        new_tokens = hit_tokens - num_computed_tokens
        return new_tokens, not (state.all_local and self._in_step_loads)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0:
            return
        state = self._requests.get(request.request_id)
        if state is None:
            return
        (block_ids,) = blocks.get_block_ids()
        bs, bpc = self._layout.block_size, self._blocks_per_chunk
        first_block = state.local_computed // bs
        end_block = -(-(state.local_computed + num_external_tokens) // bs)  # ceiling
        chunks = state.load_chunks(self._cfg.chunk_tokens, bpc)
        loads: list[ChunkLoad] = []
        for c in range(first_block // bpc, len(chunks)):
            n = chunks[c].num_blocks
            writes = tuple(
                (j, block_ids[c * bpc + j])
                for j in range(n)
                if first_block <= c * bpc + j < end_block and c * bpc + j < len(block_ids)
            )
            if not writes:
                break
            loads.append(ChunkLoad(keys=chunks[c].keys, blocks=writes, num_blocks=n))
        consumer = state.consumer is not None
        is_async = consumer or not (state.all_local and self._in_step_loads)
        if consumer:
            wait = self._cfg.transfer_timeout_s
        elif is_async:
            wait = self._cfg.load_timeout_s
        else:  # inside the step: memory hits need no wait, SSD hits their promotion
            wait = self._cfg.ssd_sync_wait_s if state.ssd_hit else 0.0
        state.load_issued = True
        state.saves_at_load = (
            state.saved_chunks, state.tail_saved, state.block_tail_saved, state.held
        )  # fmt: skip
        # The promised chunks are in the agent already: saving them again would cost a
        # reserve round-trip (answered "exists") on the engine's critical path every step.
        loaded_chunks = (state.local_computed + num_external_tokens) // self._cfg.chunk_tokens
        hit_full = min(state.hit_chunks, len(state.keys))
        state.saved_chunks = max(state.saved_chunks, min(hit_full, loaded_chunks))
        if state.tail is not None and state.hit_chunks > len(state.keys):
            state.tail_saved = True
        if state.hit_tail is not None and state.hit_tail == state.block_tail:
            state.block_tail_saved = True  # loaded, hence stored already
        state.pending_load = LoadSpec(request.request_id, tuple(loads), is_async, wait)
        state.load_blocks = frozenset(block for load in loads for _, block in load.blocks)
        state.load_failed = False
        state.preemptions_at_load = int(getattr(request, "num_preemptions", 0) or 0)
        self._counters.hit_tokens += num_external_tokens
        if is_async:
            self._counters.async_loads += 1
        if state.consumer is not None:
            self._counters.transfers_in += 1
            self._counters.transfer_tokens += num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> MeshKVConnectorMetadata:
        if self._queued:
            self._queued.renew_due()
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
        chunk, bpc = self._cfg.chunk_tokens, self._blocks_per_chunk
        prompt_len = len(state.request.prompt_token_ids or [])
        keys = state.keys
        full_chunks = done_tokens // chunk
        if full_chunks > len(keys):
            if not self._cfg.save_decode_tokens:
                full_chunks = len(keys)
            else:
                keys = self._decode_keys(state, full_chunks)
        saves: list[ChunkSave] = []
        block_ids: list[int] = []
        block_tail = state.block_tail
        if block_tail is not None and (
            state.block_tail_saved or done_tokens < len(state.keys) * chunk + block_tail.num_tokens
        ):
            block_tail = None  # saved, or its blocks are not all computed yet
        if (
            full_chunks > state.saved_chunks
            or (state.producer is not None and not state.tail_saved and done_tokens >= prompt_len)
            or block_tail is not None
        ):
            (block_ids,) = self._kv_cache_manager.get_block_ids(req_id)
        for c in range(state.saved_chunks, min(full_chunks, len(keys))):
            blocks = block_ids[c * bpc : (c + 1) * bpc]
            if len(blocks) < bpc:
                break
            saves.append(ChunkSave(keys[c], tuple(blocks), c, chunk))
            if self.events is not None:
                event = chunk_event(state.request, c, chunk, self._layout.block_size)
                if event is not None:
                    self.events.plan(req_id, c, event, keys[c][0])
        if saves:
            state.saved_chunks = saves[-1].index + 1
        if block_tail is not None and state.saved_chunks >= len(state.keys):
            first = len(state.keys) * bpc
            blocks = block_ids[first : first + block_tail.num_blocks]
            if len(blocks) == block_tail.num_blocks:
                index, size = len(state.keys), block_tail.num_tokens
                saves.append(ChunkSave(block_tail.keys, tuple(blocks), index, size))
                state.block_tail_saved = True
        tail = state.tail
        if (
            state.producer is not None
            and tail is not None
            and not state.tail_saved
            and done_tokens >= prompt_len
            and state.saved_chunks >= len(state.keys)
        ):
            first = len(state.keys) * bpc
            blocks = block_ids[first : first + tail.num_blocks]
            if len(blocks) == tail.num_blocks:
                saves.append(ChunkSave(tail.keys, tuple(blocks), len(state.keys), tail.num_tokens))
                state.tail_saved = True
        hold = None
        if (
            state.producer is not None
            and not state.held
            and state.transfer_id is not None
            and state.saved_chunks >= len(state.keys)
            and (tail is None or state.tail_saved)
        ):
            state.held = True
            hold = HoldSpec(
                state.transfer_id,
                tuple(c.keys for c in state.chunks(chunk, bpc)),
                self._cfg.transfer_hold_s,
                state.producer.push_to,
            )
        if saves or hold is not None:
            meta.saves.append(SaveSpec(req_id, tuple(saves), hold, state.producer is not None))

    def _decode_keys(self, state: _RequestState, full_chunks: int) -> list[tuple[ChunkKey, ...]]:
        tokens = list(state.request.all_token_ids[: full_chunks * self._cfg.chunk_tokens])
        if len(state.keys) + len(state.extra_keys) < full_chunks:
            all_keys = self._keys_for(state.request, tokens)
            state.extra_keys = all_keys[len(state.keys) :]
        return state.keys + state.extra_keys

    def load_failures(self, failed_requests: Iterable[str], invalid_blocks: set[int]) -> None:
        """vLLM's report of loads that failed (``failed_recving``: asynchronous loads by
        request; ``invalid_block_ids``: blocks of any load): those requests are computed
        if vLLM asks about them again, never loaded again."""
        for req_id in failed_requests:
            state = self._requests.get(req_id)
            if state is not None:
                self._load_failed(state)
        if invalid_blocks:
            for state in self._requests.values():
                if state.load_blocks and not state.load_blocks.isdisjoint(invalid_blocks):
                    self._load_failed(state)

    @staticmethod
    def _load_failed(state: _RequestState) -> None:
        """The worker skipped the saves (and the transfer hold) it was given for the request
        in the step whose load failed, and the chunks planning the load counted as stored
        may not be: plan them again from where they stood before the load, so the
        recomputed blocks are saved and, on a prefill engine, held for the decode engine."""
        state.load_failed = True
        if state.saves_at_load is not None:
            (state.saved_chunks, state.tail_saved, state.block_tail_saved,
             state.held) = state.saves_at_load  # fmt: skip
            state.saves_at_load = None

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        # Saves copy their blocks into the arena inside the step that computed them
        # (wait_for_save), so no block of a finished request is still being read: vLLM may
        # free them now, for a prefill/decode transfer too.
        state = self._requests.pop(request.request_id, None)
        params = getattr(request, "kv_transfer_params", None)
        self._queued.finished(request.request_id)  # ended in the queue: the producer lets go
        if state is not None and state.producer is not None and state.held:
            node = self._agent.node_id()
            last = state.tail.keys if state.tail is not None else (state.keys or [()])[-1]
            if node is not None and state.transfer_id is not None and last:
                self._counters.transfers_out += 1
                return False, producer_params(
                    producer=node,
                    transfer_id=state.transfer_id,
                    tokens=len(request.prompt_token_ids or []),
                    chunk_tokens=self._cfg.chunk_tokens,
                    last_key=last[0],
                    expires=time.time() + self._cfg.transfer_hold_s,
                    engine=self._engine,
                )
        if (state is not None and state.consumer is not None) or wants_identity(params):
            node = self._agent.node_id()
            if node is not None:
                return False, identity_params(node)
        return False, None

    def close(self) -> None:
        self._requests.clear()
        self._queued.clear()
        self._agent.close()
