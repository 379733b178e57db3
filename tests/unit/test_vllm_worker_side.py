"""The connector's worker side on its own, against a fake agent.

No engine: the agent is a fake of ``WorkerAgent`` backed by a bytearray "arena"; the worker
copies real CPU-layout KV tensors (and CUDA ones where a GPU is present) with the real
kernels. The scheduler side: ``test_vllm_sides.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import pytest
import torch

from meshkv.chunk import ChunkKey, payload_checksum
from meshkv.client import Lease, Reservation, Reserved, TransferHold
from meshkv.errors import ConfigError
from meshkv.integrations.vllm.logs import share_vllm_logging
from meshkv.integrations.vllm.metadata import (
    ChunkLoad,
    ChunkSave,
    HoldSpec,
    LoadSpec,
    MeshKVConnectorMetadata,
    SaveSpec,
)
from meshkv.integrations.vllm.stats import ConnectorCounters
from meshkv.integrations.vllm.worker import SkipLog, WorkerSide
from meshkv.kernels import pin_host_memory, unpin_host_memory
from tests.helpers.vllm_sides import BS, CHUNK, LAYOUT, config


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
        self.waits: list[tuple[int, float]] = []
        """(lane, wait) of every read."""
        self.warmed = False

    def warm_up(self) -> None:
        self.warmed = True

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
        self.waits.append((lane, wait))
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


def test_registration_connects_to_the_agent_before_any_load() -> None:
    """The connections and the arena mapping are made when vLLM registers the caches, not
    inside the first load's deadline (a TP=2 engine's first loads missed it: 0 hits)."""
    agent = FakeWorkerAgent()
    worker(agent)
    assert agent.warmed


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
    # inside the step (lane 0), the load asks the agent to wait for SSD promotions
    promoted = LoadSpec("p", (ChunkLoad((key(9),), ((0, 21),), 4),), False, wait_s=0.25)
    dst.start_load_kv(MeshKVConnectorMetadata(CHUNK, loads=[promoted]))
    assert agent.waits[-1] == (0, 0.25) and agent.waits[-2] == (0, 0.0)
    src.close()
    dst.close()
    agent.close()


def test_worker_reads_the_layout_off_the_registered_views_and_refuses_what_it_cannot_move() -> None:

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


def _load_and_save(request: str, hold: HoldSpec | None = None) -> MeshKVConnectorMetadata:
    """One step of ``request``: load key(1) into blocks 10-13, save key(5) from 14-17
    (and hold both for a transfer, with ``hold``)."""
    return MeshKVConnectorMetadata(
        CHUNK,
        loads=[
            LoadSpec(
                request,
                (ChunkLoad((key(1),), tuple((j, 10 + j) for j in range(4)), 4),),
                is_async=False,
            )
        ],
        saves=[SaveSpec(request, (ChunkSave((key(5),), (14, 15, 16, 17), 1, 64),), hold)],
    )


@pytest.mark.parametrize("device", DEVICES)
def test_a_request_that_read_a_damaged_chunk_saves_nothing_in_that_step(device: str) -> None:
    """What the step computed from damaged KV is never committed (it would be served), nor
    held for a decode engine: the scheduler plans the save and the hold again once the
    request is computed again."""
    agent = _damaged_arena(device)
    dst, _ = worker(FakeWorkerAgent(), device)
    share(dst, agent)
    meta = _load_and_save("d", HoldSpec("t-9", ((key(1),), (key(5),)), 20.0, None))
    dst.prepare(meta)
    dst.start_load_kv(meta)
    dst.wait_for_save(meta)
    drain(dst)
    assert key(5) not in agent.committed and key(5) in agent.aborted
    assert agent.holds == []
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
