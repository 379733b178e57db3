"""The connector's scheduler and worker sides on their own, against fake agents.

No engine: vLLM's objects are replaced by the few attributes the sides read (a request's
ids and tokens, the KV cache manager's block ids, a scheduler output), the agent by a fake
of ``SchedulerAgent`` / ``WorkerAgent`` backed by a bytearray "arena". The worker copies real
CPU-layout KV tensors with the real kernels.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from meshkv.chunk import ChunkKey, payload_checksum
from meshkv.client import Lease, LookupReply, Reservation, Reserved, TransferHold, TransferRef
from meshkv.errors import AgentUnavailable, ConfigError
from meshkv.integrations.vllm.config import ConnectorConfig
from meshkv.integrations.vllm.layout import EngineLayout
from meshkv.integrations.vllm.logs import share_vllm_logging
from meshkv.integrations.vllm.metadata import (
    ChunkLoad,
    ChunkSave,
    HoldSpec,
    LoadSpec,
    MeshKVConnectorMetadata,
    SaveSpec,
)
from meshkv.integrations.vllm.scheduler import SchedulerSide
from meshkv.integrations.vllm.stats import ConnectorCounters
from meshkv.integrations.vllm.transfer import parse_consumer, parse_producer
from meshkv.integrations.vllm.worker import SkipLog, WorkerSide
from meshkv.kernels import pin_host_memory, unpin_host_memory

BS = 16  # engine block size
CHUNK = 64  # tokens per chunk: 4 blocks
LAYOUT = EngineLayout(
    model="tiny", dtype="bfloat16", layer_names=("l0", "l1"), num_kv_heads=2, head_size=32,
    block_size=BS, packing="test", tp_size=1, cache_salt="",
)  # fmt: skip


def config(**kw: Any) -> ConnectorConfig:
    return ConnectorConfig.from_extra_config(
        {"socket": "/nowhere", "chunk_tokens": CHUNK, **kw}, {}
    )


def tokens(n: int, seed: int = 1) -> list[int]:
    return [(seed * 7919 + i * 104729) % 1000 + 3 for i in range(n)]


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None = None
    cache_salt: str | None = None
    lora_request: Any = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids


@dataclass
class FakeSchedulerAgent:
    """Answers lookups from ``tiers`` (key → tier) and records them."""

    tiers: dict[bytes, str] = field(default_factory=dict)
    down: bool = False
    lookups: list[tuple[list[ChunkKey], TransferRef | None]] = field(default_factory=list)
    probes: list[list[ChunkKey]] = field(default_factory=list)

    def lookup(
        self, keys: list[ChunkKey], transfer: TransferRef | None, *, probe: bool = False
    ) -> LookupReply:
        if self.down:
            raise AgentUnavailable("agent gone")
        if probe:
            self.probes.append(keys)
        else:
            self.lookups.append((keys, transfer))
        found = [self.tiers.get(k) for k in keys]
        if transfer is not None:
            found = [t or "peer" for t in found]
        prefix = found.index(None) if None in found else len(found)
        return LookupReply(prefix, found)

    def node_id(self) -> str | None:
        return None if self.down else "node-a"

    def close(self) -> None:
        pass


class Blocks:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_block_ids(self) -> tuple[list[int]]:
        return (self.ids,)


class Manager:
    def __init__(self) -> None:
        self.blocks: dict[str, list[int]] = {}

    def get_block_ids(self, req_id: str) -> tuple[list[int]]:
        return (self.blocks[req_id],)


def step_output(new: list[tuple[str, int, int]]) -> Any:
    """A scheduler output with new requests ``(req_id, computed, scheduled)``."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, num_computed_tokens=c) for r, c, _ in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[]),
        num_scheduled_tokens={r: s for r, _, s in new},
    )


def scheduler(agent: FakeSchedulerAgent, **kw: Any) -> tuple[SchedulerSide, Manager]:
    side = SchedulerSide(
        config(**kw), LAYOUT, ConnectorCounters(), agent, load_enabled=True, save_enabled=True
    )
    manager = Manager()
    side.bind_kv_cache_manager(manager)  # type: ignore[arg-type]
    return side, manager


def keys_of(side: SchedulerSide, request: Request, partial: bool = False) -> list[ChunkKey]:
    return [k[0] for k in side._keys_for(request, request.prompt_token_ids, partial=partial)]  # type: ignore[arg-type]


# --- scheduler side -----------------------------------------------------------------------


def test_local_hits_are_whole_chunks_and_loads_map_blocks() -> None:
    agent = FakeSchedulerAgent()
    side, _ = scheduler(agent)
    req = Request("r1", tokens(200))
    full = keys_of(side, req)
    assert len(full) == 3
    agent.tiers = {full[0]: "cpu", full[1]: "cpu"}
    assert side.get_num_new_matched_tokens(req, 0) == (128, False)  # type: ignore[arg-type]
    side.update_state_after_alloc(req, Blocks(list(range(100, 113))), 128)  # type: ignore[arg-type]
    meta = side.build_connector_meta(step_output([]))  # type: ignore[arg-type]
    (spec,) = meta.loads
    assert not spec.is_async and [c.keys[0] for c in spec.chunks] == full[:2]
    assert spec.chunks[1].blocks == ((0, 104), (1, 105), (2, 106), (3, 107))
    assert len(agent.lookups) == 1 and agent.lookups[0][1] is None
    assert side.request_finished(req, []) == (False, None)  # type: ignore[arg-type]


def test_never_the_whole_prompt_and_agent_down_is_zero_hits() -> None:
    agent = FakeSchedulerAgent()
    side, _ = scheduler(agent)
    req = Request("r1", tokens(128))  # exactly two chunks: the last token must be computed
    agent.tiers = dict.fromkeys(keys_of(side, req), "cpu")
    assert side.get_num_new_matched_tokens(req, 0) == (64, False)  # type: ignore[arg-type]
    agent.down = True
    assert side.get_num_new_matched_tokens(Request("r2", tokens(300)), 0) == (0, False)  # type: ignore[arg-type]


def test_prefill_saves_the_partial_tail_holds_and_returns_params() -> None:
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent, transfer_hold_s=30.0)
    params = {"do_remote_decode": True, "do_remote_prefill": False, "meshkv_push_to": "node-d"}
    req = Request("p1", tokens(150), params)  # 2 full chunks + 22 tokens (2 blocks)
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
    manager.blocks["p1"] = list(range(10, 20))
    meta = side.build_connector_meta(step_output([("p1", 0, 150)]))  # type: ignore[arg-type]
    (spec,) = meta.saves
    assert [c.num_tokens for c in spec.chunks] == [64, 64, 22]
    assert spec.transfer  # the worker waits transfer_save_timeout_s for its reserve
    assert spec.chunks[2].block_ids == (18, 19)
    every = keys_of(side, req, partial=True)
    assert [c.keys[0] for c in spec.chunks] == every
    assert spec.hold is not None and spec.hold.push_to == "node-d" and spec.hold.hold_s == 30.0
    assert [k[0] for k in spec.hold.keys] == every
    delay, out = side.request_finished(req, [])  # type: ignore[arg-type]
    assert delay is False and out is not None
    assert out["do_remote_prefill"] is True and out["do_remote_decode"] is False
    consumer = parse_consumer(out)
    assert consumer is not None and consumer.producer == "node-a" and consumer.tokens == 150
    assert consumer.last_key == every[-1] and consumer.chunk_tokens == CHUNK
    assert consumer.transfer_id == spec.hold.transfer_id


def test_decode_loads_the_whole_prompt_from_the_transfer() -> None:
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent, transfer_timeout_s=4.0)
    req_p = Request("p1", tokens(150), {"do_remote_decode": True})
    side.get_num_new_matched_tokens(req_p, 0)  # type: ignore[arg-type]
    manager.blocks["p1"] = list(range(10))
    side.build_connector_meta(step_output([("p1", 0, 150)]))  # type: ignore[arg-type]
    _, params = side.request_finished(req_p, [])  # type: ignore[arg-type]
    decode, _ = scheduler(agent, transfer_timeout_s=4.0)
    req_d = Request("d1", tokens(150), params)
    assert decode.get_num_new_matched_tokens(req_d, 0) == (150, True)  # type: ignore[arg-type]
    keys, ref = agent.lookups[-1]
    assert ref is not None and ref.producer == "node-a" and ref.wait_s == 4.0
    assert keys == keys_of(decode, req_d, partial=True)
    decode.update_state_after_alloc(req_d, Blocks(list(range(50, 60))), 150)  # type: ignore[arg-type]
    (spec,) = decode.build_connector_meta(step_output([])).loads  # type: ignore[arg-type]
    assert spec.is_async and spec.wait_s == 4.0
    assert [c.num_blocks for c in spec.chunks] == [4, 4, 2]
    assert spec.chunks[2].blocks == ((0, 58), (1, 59))
    assert decode.request_finished(req_d, []) == (False, {"meshkv_node": "node-a"})  # type: ignore[arg-type]


def test_decode_of_another_prompt_ignores_the_transfer() -> None:
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent)
    req_p = Request("p1", tokens(150), {"do_remote_decode": True})
    side.get_num_new_matched_tokens(req_p, 0)  # type: ignore[arg-type]
    manager.blocks["p1"] = list(range(10))
    side.build_connector_meta(step_output([("p1", 0, 150)]))  # type: ignore[arg-type]
    _, params = side.request_finished(req_p, [])  # type: ignore[arg-type]
    other = Request("d1", tokens(149) + [5], params)  # same length, last token differs
    assert side.get_num_new_matched_tokens(other, 0) == (0, False)  # type: ignore[arg-type]
    assert agent.lookups[-1][1] is None  # a plain lookup of its own full chunks


def test_block_hits_save_a_tail_cut_to_blocks_that_a_longer_prompt_loads() -> None:
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent)
    doc = Request("a", tokens(170))  # 2 full chunks + 42 tokens: 2 whole blocks (32)
    assert side.get_num_new_matched_tokens(doc, 0) == (0, False)  # type: ignore[arg-type]
    assert agent.probes == []  # nothing hit: no second round trip
    manager.blocks["a"] = list(range(10, 21))
    (spec,) = side.build_connector_meta(step_output([("a", 0, 170)])).saves  # type: ignore[arg-type]
    assert [c.num_tokens for c in spec.chunks] == [64, 64, 32]
    assert spec.chunks[2].block_ids == (18, 19) and spec.chunks[2].index == 2
    cut = Request("cut", tokens(160))  # the same start, ending on the tail's last block
    assert [c.keys[0] for c in spec.chunks] == keys_of(side, cut, partial=True)
    # Saved once: the next step of the same request plans nothing more.
    assert side.build_connector_meta(step_output([("a", 170, 1)])).saves == []  # type: ignore[arg-type]
    agent.tiers = dict.fromkeys((c.keys[0] for c in spec.chunks), "cpu")

    # A question about the same document: its third chunk is full of other tokens, so
    # whole chunks hit two; the probe finds the document's two blocks after them.
    question = Request("q", tokens(170) + tokens(30, seed=2))  # 200 tokens
    assert side.get_num_new_matched_tokens(question, 0) == (160, False)  # type: ignore[arg-type]
    (probe,) = agent.probes
    # Cut at 3 and 2 blocks: a cut holds at least half a chunk.
    assert len(probe) == 2 and probe[1] == spec.chunks[2].keys[0]
    side.update_state_after_alloc(question, Blocks(list(range(100, 113))), 160)  # type: ignore[arg-type]
    manager.blocks["q"] = list(range(100, 113))
    meta = side.build_connector_meta(step_output([("q", 160, 40)]))  # type: ignore[arg-type]
    (load,) = meta.loads
    assert [c.num_blocks for c in load.chunks] == [4, 4, 2]  # the tail holds two
    assert load.chunks[2].blocks == ((0, 108), (1, 109)) and not load.is_async
    # It saves its own third chunk (now computed), and no tail: 8 tokens are not a block.
    (save,) = meta.saves
    assert [(c.index, c.num_tokens) for c in save.chunks] == [(2, 64)]
    assert save.chunks[0].block_ids == (108, 109, 110, 111)


def test_block_hits_leave_a_token_to_compute_and_can_be_turned_off() -> None:
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent)
    doc = Request("a", tokens(170))
    side.get_num_new_matched_tokens(doc, 0)  # type: ignore[arg-type]
    manager.blocks["a"] = list(range(11))
    (spec,) = side.build_connector_meta(step_output([("a", 0, 170)])).saves  # type: ignore[arg-type]
    agent.tiers = dict.fromkeys((c.keys[0] for c in spec.chunks), "cpu")
    # The same prompt again: 128 + 32 tokens hit, 10 are computed.
    assert side.get_num_new_matched_tokens(Request("again", tokens(170)), 0) == (160, False)  # type: ignore[arg-type]
    # A prompt that ends on the tail's last block: at most one block may be promised
    # there, less than half a chunk: not asked for.
    probes = len(agent.probes)
    assert side.get_num_new_matched_tokens(Request("cut", tokens(160)), 0) == (128, False)  # type: ignore[arg-type]
    assert len(agent.probes) == probes
    # Nor saved: 22 tokens after two chunks make one block, less than half a chunk.
    manager.blocks["short"] = list(range(10))
    side.get_num_new_matched_tokens(Request("short", tokens(150, seed=5)), 0)  # type: ignore[arg-type]
    (short,) = side.build_connector_meta(step_output([("short", 0, 150)])).saves  # type: ignore[arg-type]
    assert [c.num_tokens for c in short.chunks] == [64, 64]
    # A tail on SSD makes the load asynchronous.
    agent.tiers[spec.chunks[2].keys[0]] = "ssd"
    assert side.get_num_new_matched_tokens(Request("s", tokens(190)), 0) == (160, True)  # type: ignore[arg-type]

    off = FakeSchedulerAgent(tiers=dict(agent.tiers))
    plain, manager = scheduler(off, block_hits=False)
    assert plain.get_num_new_matched_tokens(Request("q", tokens(190)), 0) == (128, False)  # type: ignore[arg-type]
    assert off.probes == []
    manager.blocks["b"] = list(range(11))
    plain.get_num_new_matched_tokens(Request("b", tokens(170, seed=3)), 0)  # type: ignore[arg-type]
    (spec,) = plain.build_connector_meta(step_output([("b", 0, 170)])).saves  # type: ignore[arg-type]
    assert [c.num_tokens for c in spec.chunks] == [64, 64]


@pytest.mark.parametrize(
    "params",
    [
        None,
        {"do_remote_prefill": True},
        {"do_remote_prefill": True, "meshkv": "x"},
        {"do_remote_prefill": True, "meshkv": {"v": 2}},
        {"do_remote_prefill": "yes", "meshkv": {"v": 1}},
        {"do_remote_prefill": True, "meshkv": {"v": 1, "producer": "p", "transfer": "t",
                                               "tokens": -1, "chunk_tokens": 64,
                                               "last_key": "00" * 16, "expires": 1.0}},
        {"do_remote_prefill": True, "meshkv": {"v": 1, "producer": "p", "transfer": "t",
                                               "tokens": 10, "chunk_tokens": 64,
                                               "last_key": "zz" * 16, "expires": 1.0}},
    ],
)  # fmt: skip
def test_malformed_transfer_params_are_ignored(params: Any) -> None:
    assert parse_consumer(params) is None
    assert parse_producer({"do_remote_decode": True, "meshkv_push_to": 7}) is not None


# --- worker side --------------------------------------------------------------------------


class FakeWorkerAgent:
    """An arena in a bytearray; ``reserve`` may be made slow to test the deadline."""

    def __init__(self, size: int = 1 << 22) -> None:
        self.arena = bytearray(size)
        self.view = memoryview(self.arena)
        self.next = 0
        self.slots: dict[bytes, tuple[int, int]] = {}
        self.committed: dict[bytes, int] = {}
        self.aborted: list[bytes] = []
        self.holds: list[tuple[list[bytes], TransferHold]] = []
        self.released: list[int] = []
        self.reserve_delay = 0.0
        self.room: int | None = None
        """New slots the next reserves may still place (None: unlimited)."""
        self.budgets: list[float | None] = []
        self.lock = threading.Lock()
        self.pinned: torch.Tensor | None = None
        self.checksums: dict[bytes, int | None] = {}
        self.reported: list[bytes] = []

    def pin_arenas(self) -> None:
        """As the real link does for a GPU engine: page-lock the arena (kernels copy to and
        from it directly)."""
        tensor = torch.frombuffer(self.arena, dtype=torch.uint8)
        if pin_host_memory(tensor):
            self.pinned = tensor

    def reserve(
        self, keys: list[ChunkKey], sizes: list[int], budget: float | None = None
    ) -> Reserved:
        """As the agent's partial reserve: keys past ``room`` new slots come back unplaced."""
        self.budgets.append(budget)
        time.sleep(self.reserve_delay)
        out = Reserved()
        with self.lock:
            for i, (key, size) in enumerate(zip(keys, sizes, strict=True)):
                if key in self.slots:
                    out.append(None)
                    continue
                if self.room is not None:
                    if self.room <= 0:
                        out.unplaced = len(keys) - i
                        out.extend([None] * out.unplaced)
                        break
                    self.room -= 1
                self.slots[key] = (self.next, size)
                out.append(Reservation(key, self.next, self.view[self.next : self.next + size]))
                self.next += size
        return out

    def commit(self, keys: list[ChunkKey], tokens: list[int], checksums: list[int | None]) -> None:
        with self.lock:
            self.committed.update(zip(keys, tokens, strict=True))
            for key, checksum in zip(keys, checksums, strict=True):
                offset, size = self.slots[key]
                assert checksum == payload_checksum(self.view[offset : offset + size])
                self.checksums[key] = checksum

    def abort(self, keys: list[ChunkKey]) -> None:
        with self.lock:
            self.aborted.extend(keys)
            for key in keys:
                self.slots.pop(key, None)

    def hold(self, keys: list[ChunkKey], hold: TransferHold) -> int:
        self.holds.append((list(keys), hold))
        return len(keys)

    def read(self, keys: list[ChunkKey], wait: float, *, lane: int) -> list[Lease | None]:
        out: list[Lease | None] = []
        for i, key in enumerate(keys):
            if key not in self.committed:
                out.append(None)
                continue
            offset, size = self.slots[key]
            view = self.view[offset : offset + size].toreadonly()
            out.append(
                Lease(i + 1, key, offset, view, self.committed[key], self.checksums.get(key))
            )
        return out

    def release(self, leases: Any, *, lane: int) -> None:
        self.released.extend(lease.lease_id for lease in leases)

    def report_corrupt(self, keys: list[ChunkKey]) -> None:
        self.reported.extend(keys)

    def close(self) -> None:
        if self.pinned is not None:
            unpin_host_memory(self.pinned)
            self.pinned = None


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def caches(blocks: int = 24, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (blocks, LAYOUT.num_kv_heads, BS, 2 * LAYOUT.head_size)
    return {
        name: torch.randn(shape, generator=g).to(torch.bfloat16).to(device)
        for name in LAYOUT.layer_names
    }


def worker(
    agent: FakeWorkerAgent, device: str = "cpu", **kw: Any
) -> tuple[WorkerSide, dict[str, torch.Tensor]]:
    side = WorkerSide(config(**kw), LAYOUT, ConnectorCounters(), 0, agent)
    kv = caches(device=device)
    side.register_kv_caches(kv)
    return side, kv


def share(side: WorkerSide, agent: FakeWorkerAgent) -> None:
    """Point ``side`` at ``agent``'s arena, closing (unpinning) the one it was built with:
    a pinned bytearray freed while still registered made the next registration at that
    address fail on a GPU."""
    own = side._agent
    side._agent = agent
    own.close()


def saved(
    device: str, *saves: ChunkSave
) -> tuple[FakeWorkerAgent, WorkerSide, dict[str, torch.Tensor]]:
    """A source engine's worker that saved ``saves`` (request "p") into a fresh fake agent:
    the agent, the worker and its caches."""
    agent = FakeWorkerAgent()
    src, kv_src = worker(agent, device)
    meta = MeshKVConnectorMetadata(CHUNK, saves=[SaveSpec("p", saves)])
    src.prepare(meta)
    src.wait_for_save(meta)
    drain(src)
    return agent, src, kv_src


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "big"))


def drain(side: WorkerSide) -> None:
    side._save_pool.submit(lambda: None).result(5)


TWO_CHUNKS = (ChunkSave((key(1),), (0, 1, 2, 3), 0, 64), ChunkSave((key(2),), (4, 5, 6, 7), 1, 64))
"""Blocks 0-3 as chunk key(1), 4-7 as key(2)."""


@pytest.mark.parametrize("device", DEVICES)
def test_save_copies_blocks_then_commits_and_holds_off_the_step(device: str) -> None:
    agent = FakeWorkerAgent()
    side, kv = worker(agent, device)
    assert (agent.pinned is not None) == (device == "cuda")
    hold = HoldSpec("t-1", ((key(1),), (key(2),)), 20.0, "node-d")
    meta = MeshKVConnectorMetadata(
        CHUNK,
        saves=[
            SaveSpec(
                "p1",
                (ChunkSave((key(1),), (3, 4, 5, 6), 0, 64), ChunkSave((key(2),), (7, 8), 1, 20)),
                hold,
            )
        ],
    )
    side.prepare(meta)
    side.start_load_kv(meta)
    side.wait_for_save(meta)
    drain(side)
    assert agent.committed == {key(1): 64, key(2): 20}
    assert agent.holds == [([key(1), key(2)], TransferHold("t-1", 20.0, "node-d"))]
    offset, size = agent.slots[key(2)]
    per_layer = size // len(LAYOUT.layer_names)
    for layer, name in enumerate(LAYOUT.layer_names):
        expect = kv[name][7:9].contiguous().view(torch.uint8).flatten().cpu()
        got = torch.frombuffer(agent.arena, dtype=torch.uint8, count=per_layer,
                               offset=offset + layer * per_layer)  # fmt: skip
        assert torch.equal(got, expect)
    side.close()
    agent.close()


def test_a_slow_reserve_skips_the_save_and_gives_the_slots_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = FakeWorkerAgent()
    agent.reserve_delay = 0.3
    side, _ = worker(agent, save_timeout_s=0.05)
    meta = MeshKVConnectorMetadata(
        CHUNK, saves=[SaveSpec("r", (ChunkSave((key(1),), (0, 1, 2, 3), 0, 64),))]
    )
    side.prepare(meta)
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="meshkv"):
        side.wait_for_save(meta)
    assert time.perf_counter() - started < 0.25  # the step did not wait for the agent
    time.sleep(0.4)
    drain(side)
    assert agent.committed == {} and agent.aborted == [key(1)]
    assert side._counters.save_skipped == 1
    # The engine's log says so (a skipped transfer save is otherwise invisible).
    assert [r.getMessage() for r in caplog.records] == [
        "meshkv skipped saving 1 chunk(s): the agent did not answer the reserve within 0.05 s"
    ]
    side.close()


def test_a_step_whose_last_chunks_find_no_room_saves_the_ones_before(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The agent's partial reserve: a full arena that places one of a prompt's two chunks
    still gets the first (a later lookup hits it), and the second is counted as skipped,
    not as a duplicate."""
    agent = FakeWorkerAgent()
    agent.room = 1
    side, kv = worker(agent)
    meta = MeshKVConnectorMetadata(CHUNK, saves=[SaveSpec("r", TWO_CHUNKS)])
    side.prepare(meta)
    with caplog.at_level(logging.WARNING, logger="meshkv"):
        side.wait_for_save(meta)
    drain(side)
    assert agent.committed == {key(1): 64} and agent.aborted == []
    assert side._counters.save_skipped == 1 and side._counters.save_duplicates == 0
    assert [r.getMessage() for r in caplog.records] == [
        "meshkv skipped saving 1 chunk(s): no space in the agent's arena"
    ]
    offset, size = agent.slots[key(1)]
    per_layer = size // len(LAYOUT.layer_names)
    name = LAYOUT.layer_names[0]
    expect = kv[name][0:4].contiguous().view(torch.uint8).flatten()
    got = torch.frombuffer(agent.arena, dtype=torch.uint8, count=per_layer, offset=offset)
    assert torch.equal(got, expect)
    # Stored before: a duplicate, not a skip.
    agent.room = None
    side.prepare(meta)
    side.wait_for_save(meta)
    drain(side)
    assert agent.committed == {key(1): 64, key(2): 64}
    assert side._counters.save_duplicates == 1 and side._counters.save_skipped == 1
    side.close()


def test_a_transfers_save_waits_longer_for_a_slow_reserve() -> None:
    """A prefill step that saves a transfer's chunks waits ``transfer_save_timeout_s`` for
    the reserve: skipped, the whole prompt would be computed again on the decode engine."""
    agent = FakeWorkerAgent()
    agent.reserve_delay = 0.3
    side, _ = worker(agent, save_timeout_s=0.05, transfer_save_timeout_s=2.0)
    chunk = ChunkSave((key(1),), (0, 1, 2, 3), 0, 64)
    plain = MeshKVConnectorMetadata(CHUNK, saves=[SaveSpec("a", (chunk,))])
    side.prepare(plain)
    side.wait_for_save(plain)  # an ordinary save still gives up at save_timeout_s
    time.sleep(0.4)
    drain(side)
    assert agent.committed == {} and side._counters.save_skipped == 1
    spec = SaveSpec("p", (chunk,), transfer=True)
    meta = MeshKVConnectorMetadata(CHUNK, saves=[spec])
    side.prepare(meta)
    side.wait_for_save(meta)
    drain(side)
    assert agent.committed == {key(1): 64}
    assert side._counters.save_skipped == 1
    assert agent.budgets == [0.05, 2.0]  # the reserve call's own deadline is longer too
    side.close()


def test_skipped_saves_are_logged_once_per_interval_with_their_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    skips = SkipLog(interval_s=0.2)
    with caplog.at_level(logging.WARNING, logger="meshkv"):
        skips.skipped(2, "agent down")
        skips.skipped(3, "agent down")  # within the interval: counted, not logged
        time.sleep(0.25)
        skips.skipped(1, "no space")
        time.sleep(0.25)
        skips.skipped(1, "no space")
    assert [r.getMessage() for r in caplog.records] == [
        "meshkv skipped saving 2 chunk(s): agent down",
        "meshkv skipped saving 4 chunk(s): 3 because agent down; 1 because no space",
        "meshkv skipped saving 1 chunk(s): no space",
    ]


def test_connector_logs_go_through_vllms_handlers_unless_meshkv_has_its_own() -> None:
    ours, theirs = logging.getLogger("meshkv"), logging.getLogger("vllm")
    saved = (ours.handlers[:], ours.level, ours.propagate, theirs.handlers[:])
    handler = logging.StreamHandler()
    try:
        ours.handlers = []
        theirs.handlers = [handler]
        share_vllm_logging()
        assert ours.handlers == [handler] and not ours.propagate
        own = logging.NullHandler()
        ours.handlers = [own]
        share_vllm_logging()  # the user's own configuration is left alone
        assert ours.handlers == [own]
    finally:
        ours.handlers, ours.level, ours.propagate, theirs.handlers = saved


@pytest.mark.parametrize("device", DEVICES)
def test_async_load_of_a_tail_chunk_and_a_missing_one(device: str) -> None:
    agent, src, kv_src = saved(
        device, ChunkSave((key(1),), (0, 1, 2, 3), 0, 64), ChunkSave((key(2),), (4, 5), 1, 30)
    )
    dst, kv_dst = worker(FakeWorkerAgent(), device)
    share(dst, agent)  # the decode side reads the same arena
    load = LoadSpec(
        "d",
        (
            ChunkLoad((key(1),), tuple((j, 10 + j) for j in range(4)), 4),
            ChunkLoad((key(2),), ((0, 14), (1, 15)), 2),
        ),
        is_async=True,
        wait_s=1.0,
    )
    dst.start_load_kv(MeshKVConnectorMetadata(CHUNK, loads=[load]))
    for _ in range(100):
        if dst.get_finished() == {"d"}:
            break
        time.sleep(0.01)
    assert dst.get_block_ids_with_load_errors() == set()
    for name in LAYOUT.layer_names:
        assert torch.equal(kv_dst[name][10:16], kv_src[name][0:6])
    missing = LoadSpec("m", (ChunkLoad((key(9),), ((0, 20),), 4),), is_async=False)
    dst.start_load_kv(MeshKVConnectorMetadata(CHUNK, loads=[missing]))
    assert dst.get_block_ids_with_load_errors() == {20}
    src.close()
    dst.close()
    agent.close()


def test_worker_reads_the_layout_off_the_registered_views_and_refuses_what_it_cannot_move() -> None:
    from dataclasses import replace

    from meshkv.errors import ConfigError
    from meshkv.integrations.vllm.worker import engine_kv_layout

    blocks = 6
    whole = torch.zeros(2, blocks, 2, BS, 64, dtype=torch.bfloat16)  # [L, B, H, N, C]
    views = [whole[i] for i in range(2)]
    assert engine_kv_layout(views, LAYOUT).page == "HNC"
    nhd = whole.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)  # LBNHC strides
    assert engine_kv_layout([nhd[i] for i in range(2)], LAYOUT).page == "NHC"
    with pytest.raises(ConfigError, match="store a block as NHC, but its KV cache layout says"):
        engine_kv_layout([nhd[i] for i in range(2)], replace(LAYOUT, page="HNC"))
    with pytest.raises(ConfigError, match="do not match the KV cache spec"):
        engine_kv_layout(views, replace(LAYOUT, num_kv_heads=4))
    flash = torch.zeros(2, blocks, BS, 2, 32, dtype=torch.bfloat16)  # an older 5-D cache
    with pytest.raises(
        ConfigError, match=r"cannot move this engine's KV cache .*\(2, 6, 16, 2, 32\)"
    ):
        engine_kv_layout([flash, flash], LAYOUT)


@pytest.mark.parametrize("device", DEVICES)
def test_a_chunk_damaged_in_the_arena_after_commit_is_recomputed_and_reported(device: str) -> None:
    agent, src, kv_src = saved(device, *TWO_CHUNKS)
    offset, size = agent.slots[key(2)]
    agent.arena[offset + size // 2] ^= 0xFF  # one flipped byte in the second chunk
    dst, kv_dst = worker(FakeWorkerAgent(), device)
    share(dst, agent)
    load = LoadSpec(
        "d",
        (
            ChunkLoad((key(1),), tuple((j, 10 + j) for j in range(4)), 4),
            ChunkLoad((key(2),), tuple((j, 14 + j) for j in range(4)), 4),
        ),
        is_async=False,
    )
    dst.start_load_kv(MeshKVConnectorMetadata(CHUNK, loads=[load]))
    assert dst.get_block_ids_with_load_errors() == {14, 15, 16, 17}
    for name in LAYOUT.layer_names:
        assert torch.equal(kv_dst[name][10:14], kv_src[name][0:4])  # the good chunk is used
    drain(dst)
    assert agent.reported == [key(2)]
    counters = dst._counters
    assert counters.corrupt_chunks == 1 and counters.loaded_chunks == 1
    # with verify_loads off the damaged bytes are used as they are (the negative control)
    off, _ = worker(FakeWorkerAgent(), device, verify_loads=False)
    share(off, agent)
    off.start_load_kv(MeshKVConnectorMetadata(CHUNK, loads=[load]))
    assert off.get_block_ids_with_load_errors() == set()
    for side in (src, dst, off):
        side.close()
    agent.close()


def _damaged_arena(device: str) -> FakeWorkerAgent:
    """An agent holding chunk key(1) (blocks 0-3 of a source engine), one byte flipped."""
    agent, src, _ = saved(device, ChunkSave((key(1),), (0, 1, 2, 3), 0, 64))
    src.close()
    offset, size = agent.slots[key(1)]
    agent.arena[offset + size // 3] ^= 0xFF
    return agent


def _load_and_save(request: str) -> MeshKVConnectorMetadata:
    """One step of ``request``: load key(1) into blocks 10-13, save key(5) from 14-17."""
    return MeshKVConnectorMetadata(
        CHUNK,
        loads=[
            LoadSpec(
                request,
                (ChunkLoad((key(1),), tuple((j, 10 + j) for j in range(4)), 4),),
                is_async=False,
            )
        ],
        saves=[SaveSpec(request, (ChunkSave((key(5),), (14, 15, 16, 17), 1, 64),))],
    )


@pytest.mark.parametrize("device", DEVICES)
def test_a_request_that_read_a_damaged_chunk_saves_nothing_in_that_step(device: str) -> None:
    """What the step computed from damaged KV is never committed (it would be served)."""
    agent = _damaged_arena(device)
    dst, _ = worker(FakeWorkerAgent(), device)
    share(dst, agent)
    meta = _load_and_save("d")
    dst.prepare(meta)
    dst.start_load_kv(meta)
    dst.wait_for_save(meta)
    drain(dst)
    assert key(5) not in agent.committed and key(5) in agent.aborted
    assert dst.get_block_ids_with_load_errors() == {10, 11, 12, 13}
    dst.close()
    agent.close()


def test_hashes_taken_beside_a_gpu_copy_are_settled_before_the_steps_saves() -> None:
    """The GPU path's settling, driven on CPU: a hash result that does not match, injected
    as the hash thread would deliver it, fails the request before ``wait_for_save`` picks
    what to save, and its blocks are reported."""
    agent = _damaged_arena("cpu")
    dst, _ = worker(FakeWorkerAgent(), verify_loads=False)  # the CPU path does not look
    share(dst, agent)
    meta = _load_and_save("d")
    dst.prepare(meta)
    dst.start_load_kv(meta)
    (lease,) = agent.read([key(1)], 0.0, lane=0)
    assert lease is not None
    digest: Future[int] = Future()
    digest.set_result(payload_checksum(lease.view))  # the damaged bytes' hash
    dst._checks.append(("d", meta.loads[0].chunks[0], lease, digest))
    dst.wait_for_save(meta)
    drain(dst)
    assert key(5) not in agent.committed and key(5) in agent.aborted
    assert dst.get_block_ids_with_load_errors() == {10, 11, 12, 13}
    assert agent.reported == [key(1)] and dst._counters.corrupt_chunks == 1
    dst.close()


@pytest.mark.parametrize("device", DEVICES)
def test_layered_loads_wait_per_layer_and_release_the_leases_after_the_copies(
    device: str,
) -> None:
    agent, src, kv_src = saved(device, *TWO_CHUNKS)
    dst, kv_dst = worker(FakeWorkerAgent(), device, layer_loads=True)
    share(dst, agent)
    load = LoadSpec(
        "d",
        (
            ChunkLoad((key(1),), tuple((j, 10 + j) for j in range(4)), 4),
            ChunkLoad((key(2),), ((1, 15), (3, 16)), 4),  # vLLM computed blocks 0 and 2
        ),
        is_async=False,
    )
    dst.start_load_kv(MeshKVConnectorMetadata(CHUNK, loads=[load]))
    names = LAYOUT.layer_names
    # on a GPU each layer has its own event; on CPU the copy is done already
    assert set(dst._layer_ready) == (set(names) if device == "cuda" else set())
    dst.wait_for_layer_load(names[0])
    assert torch.equal(kv_dst[names[0]][10:14], kv_src[names[0]][0:4])
    # vLLM did not wait for the other layers: the end of the step does
    dst.wait_for_save(MeshKVConnectorMetadata(CHUNK))
    assert dst._layer_ready == {}
    for name in names:
        assert torch.equal(kv_dst[name][10:14], kv_src[name][0:4])
        assert torch.equal(kv_dst[name][15], kv_src[name][5])
        assert torch.equal(kv_dst[name][16], kv_src[name][7])
    if device == "cuda":
        torch.cuda.synchronize()
    # settles the hashes, then releases what is done, on the engine's thread (lane 0)
    assert dst.get_block_ids_with_load_errors() == set()
    assert sorted(agent.released) == [1, 2]
    assert dst._counters.loaded_chunks == 2
    src.close()
    dst.close()
    agent.close()


def test_revision_and_quantization_isolate_the_namespace() -> None:
    base = LAYOUT.namespace(0).digest()
    assert replace(LAYOUT, revision="").namespace(0).digest() == base
    other_rev = replace(LAYOUT, revision="abc123").namespace(0).digest()
    quantized = replace(LAYOUT, quantization="awq").namespace(0).digest()
    assert len({base, other_rev, quantized}) == 3


@pytest.mark.parametrize("bad", [0, -1.0, "2s", True])
def test_transfer_save_timeout_must_be_positive_seconds(bad: Any) -> None:
    with pytest.raises(ConfigError, match="transfer_save_timeout_s"):
        config(transfer_save_timeout_s=bad)
