"""The local server and the puller against a scripted mesh (a fake ``ChunkSource``).

Real ``Store``, real ``Puller``, real ``LocalServer`` on a Unix socket, real
``AgentClient``; only the mesh — the network edge — is scripted, so the contract of the
local channel's lookups and reads is tested on its own: peer tiers extend the prefix and
their flights start at once, a ``read(wait=...)`` waits for them, a chunk is pulled once
however many ask (single flight), a slow or failing mesh never holds a lookup past its
share of the client's budget, a transfer's chunks come from its producer without any
directory round trip and the producer hears ``transfer_done`` once, and a chunk that is
still landing (a push) is waited for rather than pulled again, and a read with a deadline
answers by it however slow the SSD is.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from meshkv.chunk import ChunkKey, Namespace, NamespaceId
from meshkv.client import AgentClient, TransferRef
from meshkv.errors import NoSpace, ProtocolError, TransportError
from meshkv.protocol import Op
from meshkv.puller import Puller
from meshkv.server.local import LocalServer, LocalServerConfig
from meshkv.store import Store
from tests.helpers.cycles import run_without_cycle_collector
from tests.helpers.stores import store_config

PEER_BYTES = b"bytes pulled from a peer" * 100
PULL_OWNER = -7


class ScriptedSource:
    """Claims every key starting with b"P" is on node "peer-1"; a pull stores it after
    ``pull_delay`` seconds. Counts every call, from any thread."""

    def __init__(
        self,
        store: Store,
        *,
        lookup_delay: float = 0.0,
        pull_delay: float = 0.2,
        fail: bool = False,
    ) -> None:
        self.store = store
        self.puller: Puller | None = None
        """The agent's puller (set by ``serve``), for its stats."""
        self.lookup_delay = lookup_delay
        self.pull_delay = pull_delay
        self.fail = fail
        self.located: list[ChunkKey] = []
        self.pulled: list[tuple[ChunkKey, str]] = []
        self.done: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    async def locate(
        self, ns: NamespaceId, keys: Sequence[ChunkKey], deadline: float
    ) -> dict[ChunkKey, tuple[str, ...]]:
        self.located.extend(keys)
        await asyncio.sleep(self.lookup_delay)
        if self.fail:
            raise TransportError("peer unreachable")
        return {k: ("peer-1",) for k in keys if k.startswith(b"P")}

    def order(self, holders: Sequence[str]) -> list[str]:
        return list(holders)

    async def pull(
        self,
        ns: NamespaceId,
        key: ChunkKey,
        holder: str,
        deadline: float,
        *,
        last: bool,
        named: bool = False,
    ) -> str | None:
        self.pulled.append((key, holder))
        await asyncio.sleep(self.pull_delay)  # the pull takes a while
        slot = self.store.reserve(ns, key, len(PEER_BYTES), owner=PULL_OWNER)
        if slot is None:
            return None
        self.store.payload(slot)[:] = PEER_BYTES
        self.store.commit(ns, key, PULL_OWNER, num_tokens=16)
        return None

    def transfer_done(self, producer: str, transfer_id: str) -> None:
        self.done.append((producer, transfer_id))


Scenario = Callable[[str, ScriptedSource, Store, asyncio.AbstractEventLoop], None]


async def serve(
    source_kwargs: dict[str, object], scenario: Scenario, store: Store | None = None
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mkv-seam-", dir="/tmp"))
    if store is None:
        store = Store(store_config(cpu_bytes=64 << 20, prefault=False))
    await store.start()
    puller = Puller(store)
    source = ScriptedSource(store, **source_kwargs)  # type: ignore[arg-type]
    puller.add_source(source)
    source.puller = puller
    server = LocalServer(
        LocalServerConfig(str(tmp / "agent.sock"), "n1", remote_lookup_timeout_s=0.3),
        store,
        puller=puller,
    )
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        await asyncio.to_thread(scenario, str(tmp / "agent.sock"), source, store, loop)
    finally:
        await server.close(loop.time() + 2)
        await puller.close()
        await store.close(loop.time() + 2)
        shutil.rmtree(tmp, ignore_errors=True)


def test_peer_chunks_extend_the_prefix_and_reads_wait_for_the_pull() -> None:
    def scenario(path: str, source: ScriptedSource, store: Store, loop: object) -> None:
        with AgentClient(path) as c:
            assert c.put(b"L" * 16, b"local")
            keys = [b"L" * 16, b"P1" * 8, b"P2" * 8, b"M" * 16, b"P3" * 8]
            reply = c.lookup(keys)
            assert reply.tiers == ["cpu", "peer", "peer", None, "peer"]
            assert reply.prefix == 3
            leases = c.read(keys[:3], wait=5.0)  # waits for the pulls the lookup started
            assert [x is not None for x in leases] == [True, True, True]
            assert leases[1] is not None and bytes(leases[1].view) == PEER_BYTES
            c.release([x for x in leases if x is not None])
            del leases
            pulled = sorted(k for k, _ in source.pulled)
            assert pulled == sorted([b"P1" * 8, b"P2" * 8])  # the prefix only, once each

    asyncio.run(serve({}, scenario))


def test_one_pull_however_many_ask() -> None:
    """Four clients look up and read the same peer chunks at once: one pull per chunk."""

    def scenario(path: str, source: ScriptedSource, store: Store, loop: object) -> None:
        keys = [b"P%d" % i * 8 for i in range(1, 4)]
        results: list[list[bool]] = []

        def client() -> None:
            with AgentClient(path) as c:
                assert c.lookup(keys).prefix == 3
                leases = c.read(keys, wait=5.0)
                results.append([x is not None for x in leases])
                c.release([x for x in leases if x is not None])

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == [[True] * 3] * 4
        assert sorted(k for k, _ in source.pulled) == sorted(keys)

    asyncio.run(serve({}, scenario))


def test_slow_or_failing_mesh_never_holds_a_lookup() -> None:
    def slow(path: str, source: ScriptedSource, store: Store, loop: object) -> None:
        with AgentClient(path, timeout=0.4) as c:
            c.put(b"L" * 16, b"local")
            started = time.monotonic()
            reply = c.lookup([b"L" * 16, b"P1" * 8])  # agent may spend 0.2 s (half)
            assert time.monotonic() - started < 0.35
            assert reply.tiers == ["cpu", None] and reply.prefix == 1

    asyncio.run(serve({"lookup_delay": 10.0}, slow))

    def failing(path: str, source: ScriptedSource, store: Store, loop: object) -> None:
        with AgentClient(path) as c:
            assert c.lookup([b"P1" * 8]).tiers == [None]

    asyncio.run(serve({"fail": True}, failing))


def test_transfer_comes_from_its_producer_without_the_directory() -> None:
    def scenario(path: str, source: ScriptedSource, store: Store, loop: object) -> None:
        keys = [b"T%d" % i * 8 for i in range(1, 5)]  # not "P": the directory knows nothing
        ref = TransferRef("xfer-1", "prefill-node", 5.0)
        with AgentClient(path) as c:
            reply = c.lookup(keys, transfer=ref)
            assert reply.prefix == 4 and reply.tiers == ["peer"] * 4
            leases = c.read(keys, wait=5.0)
            assert all(x is not None for x in leases)
            c.release([x for x in leases if x is not None])
        assert source.located == []  # no directory round trip
        assert sorted(source.pulled) == sorted((k, "prefill-node") for k in keys)
        assert source.done == [("prefill-node", "xfer-1")]  # told once, after the last
        with AgentClient(path) as c:  # every chunk already here (as if pushed): told at once
            assert c.lookup(keys, transfer=TransferRef("xfer-2", "prefill-node", 5.0)).prefix == 4
        assert source.done == [("prefill-node", "xfer-1"), ("prefill-node", "xfer-2")]

    asyncio.run(serve({"pull_delay": 0.05}, scenario))


def test_a_chunk_still_landing_is_waited_for_not_pulled() -> None:
    """A push (another writer) has reserved the key; a lookup reports it on its way and a
    read waits for its commit: the puller never pulls it a second time."""

    def scenario(
        path: str, source: ScriptedSource, store: Store, loop: asyncio.AbstractEventLoop
    ) -> None:
        key = ChunkKey(b"P9" * 8)
        with AgentClient(path) as c:
            ns = c.hello().namespace

            def reserve() -> None:
                slot = store.reserve(ns, key, len(PEER_BYTES), owner=PULL_OWNER - 1)
                assert slot is not None
                store.payload(slot)[:] = PEER_BYTES

            def commit() -> None:
                store.commit(ns, key, PULL_OWNER - 1, num_tokens=16)

            asyncio.run_coroutine_threadsafe(_call(reserve), loop).result(5)
            assert c.lookup([key]).tiers == ["peer"]
            loop.call_later(0.3, commit)
            started = time.monotonic()
            (lease,) = c.read([key], wait=5.0)
            assert lease is not None and bytes(lease.view) == PEER_BYTES
            assert 0.2 < time.monotonic() - started < 3.0
            c.release([lease])
        assert source.pulled == []

    asyncio.run(serve({}, scenario))


def test_a_slow_ssd_never_makes_a_read_miss_its_deadline(tmp_path: Path) -> None:
    """An engine's read of a chunk on a disk that takes 1.5 s to read it answers within
    the client's deadline (``wait`` plus half its timeout) with that chunk missing, so the
    engine computes it instead of counting the agent as down; the promotion goes on, and
    the next read finds the chunk in memory. Measured on a throttled disk (``bench serve``,
    20 MB/s): before, such reads ran past the connector's deadline and opened its breaker."""
    key = ChunkKey(b"S1" * 8)
    payload = bytes(range(256)) * 64
    ssd = str(tmp_path / "ssd")

    def write(path: str, source: ScriptedSource, store: Store, loop: object) -> None:
        with AgentClient(path) as c:
            assert c.put(key, payload)

    def ssd_store(**kw: object) -> Store:
        cfg = store_config(cpu_bytes=64 << 20, prefault=False, ssd_dir=ssd, ssd_bytes=1 << 30)
        return Store(cfg, **kw)  # type: ignore[arg-type]

    asyncio.run(serve({}, write, ssd_store()))  # closing persists the chunk to SSD

    def slow_disk(op: str, path: str) -> None:
        if op == "read":
            time.sleep(1.5)

    def scenario(path: str, source: ScriptedSource, store: Store, loop: object) -> None:
        with AgentClient(path, timeout=0.5) as c:
            assert c.lookup([key]).tiers == ["ssd"]  # starts the promotion
            started = time.monotonic()
            assert c.read([key], wait=0.1) == [None]  # no DeadlineExceeded
            assert time.monotonic() - started < 0.6
            time.sleep(1.6)
            (lease,) = c.read([key], wait=0.1)
            assert lease is not None and bytes(lease.view) == payload
            c.release([lease])
            assert store.snapshot().promotions == 1
            assert source.puller is not None
            assert source.puller.stats.reads_late_ssd == 1
            assert source.puller.stats.read_promotions == 0  # the lookup started it

    asyncio.run(serve({}, scenario, ssd_store(ssd_fault_hook=slow_disk)))


async def _call(fn: Callable[[], None]) -> None:
    fn()


@pytest.mark.parametrize("eviction", ["s3fifo", "lru"])
def test_a_read_keeps_its_chunks_while_it_waits_for_the_disk(tmp_path: Path, eviction: str) -> None:
    """A read of [A, B, C]: A is in memory, B and C on a slow disk. While the read waits
    for their promotions, another engine's saves fill the arena. A (in memory when the
    read came) and B (promoted early in the wait) must not be evicted before the read pins
    them all: a missing first chunk makes the engine compute the whole request. Found on a
    disk throttled to 84 MB/s (``bench serve``, async scheduling): 39-83 chunks a run,
    whole requests, lost this way; 0 after."""
    a, b, c = ChunkKey(b"A1" * 8), ChunkKey(b"B1" * 8), ChunkKey(b"C1" * 8)
    payload = bytes(range(256)) * 64  # 16 KiB
    ssd = str(tmp_path / "ssd")

    def ssd_store(**kw: object) -> Store:
        cfg = store_config(
            cpu_bytes=256 << 10, segment_bytes=64 << 10, prefault=False, ssd_dir=ssd,
            ssd_bytes=1 << 30, eviction=eviction,
        )  # fmt: skip
        return Store(cfg, **kw)  # type: ignore[arg-type]

    def write(path: str, source: ScriptedSource, store: Store, loop: object) -> None:
        with AgentClient(path) as client:
            assert client.put(b, payload) and client.put(c, payload)

    asyncio.run(serve({}, write, ssd_store()))  # closing persists B and C to SSD

    def slow_disk(op: str, path: str) -> None:
        if op == "read":
            time.sleep(0.4 if b.hex() in path else 1.2)  # B arrives early, C late

    def scenario(path: str, source: ScriptedSource, store: Store, loop: object) -> None:
        with AgentClient(path) as reader, AgentClient(path) as saver:
            assert reader.put(a, payload)
            done: list[object] = []
            thread = threading.Thread(target=lambda: done.append(reader.read([a, b, c], wait=3.0)))
            thread.start()
            for i in range(64):  # four arenas' worth of other requests' chunks
                time.sleep(0.02)
                with contextlib.suppress(NoSpace):  # evictions wait for their SSD writes
                    saver.put(ChunkKey(b"F%03d" % i + b"f" * 12), payload)
            thread.join(10)
            (leases,) = done
            assert isinstance(leases, list)
            assert [lease is not None for lease in leases] == [True, True, True]
            assert all(bytes(lease.view) == payload for lease in leases)
            reader.release(leases)
            # No lookup came first: the read promoted B and C itself (and not A, in memory).
            assert source.puller is not None and source.puller.stats.read_promotions == 2

    asyncio.run(serve({}, scenario, ssd_store(ssd_fault_hook=slow_disk)))


# --- tensor-parallel lookups ------------------------------------------------------------------

RANK0 = Namespace(model="tp-model", tp_size=2, tp_rank=0)
RANK1 = replace(RANK0, tp_rank=1)


def test_a_tensor_parallel_lookup_needs_every_rank_and_brings_every_rank() -> None:
    """A TP engine's lookup names rank 0's keys and the other ranks' keys for the same
    positions: a position counts only where every rank's chunk is (one rank without its
    chunk fails the whole load), and every rank's peer chunks are pulled by the lookup,
    not only rank 0's (rank 1's were never pulled before: a TP engine got no mesh hits)."""

    def scenario(path: str, source: ScriptedSource, store: Store, loop: object) -> None:
        r1 = RANK1.digest()
        with AgentClient(path, namespace=RANK0) as c0, AgentClient(path, namespace=RANK1) as c1:
            assert c0.put(b"A0" * 8, b"x") and c0.put(b"B0" * 8, b"x") and c0.put(b"C0" * 8, b"x")
            assert c1.put(b"A1" * 8, b"x") and c1.put(b"C1" * 8, b"x")  # rank 1 lacks B
            own = [b"A0" * 8, b"B0" * 8, b"C0" * 8]
            assert c0.lookup(own).prefix == 3  # rank 0 alone: all three
            reply = c0.lookup(own, ranks=[(r1, [b"A1" * 8, b"B1" * 8, b"C1" * 8])])
            assert reply.tiers == ["cpu", None, "cpu"] and reply.prefix == 1
            # Peer chunks: rank 0's second is local, rank 1's is on a peer; rank 0's third
            # on a peer, rank 1's nowhere.
            keys0 = [b"A0" * 8, b"B0" * 8, b"P3" * 8]
            keys1 = [b"A1" * 8, b"P2" * 8, b"M3" * 8]
            reply = c0.lookup(keys0, ranks=[(r1, keys1)])
            assert reply.tiers == ["cpu", "peer", None] and reply.prefix == 2
            leases = c1.read(keys1[:2], wait=5.0)  # rank 1's worker reads what it needs
            assert [x is not None for x in leases] == [True, True]
            assert leases[1] is not None and bytes(leases[1].view) == PEER_BYTES
            c1.release([x for x in leases if x is not None])
            del leases
        # Rank 1's peer chunk was pulled once, by the lookup (the read found it in flight or
        # landed); nothing past the common prefix was pulled.
        assert [k for k, _ in source.pulled] == [b"P2" * 8]
        assert store.lookup(RANK1.digest(), [b"P2" * 8]) == ["cpu"]

    asyncio.run(serve({"pull_delay": 0.05}, scenario))


def test_a_tensor_parallel_transfer_brings_every_rank_and_tells_the_producer_once() -> None:
    def scenario(path: str, source: ScriptedSource, store: Store, loop: object) -> None:
        keys0 = [b"T%d" % i * 8 for i in range(1, 4)]
        keys1 = [b"U%d" % i * 8 for i in range(1, 4)]
        with AgentClient(path, namespace=RANK0) as c0, AgentClient(path, namespace=RANK1) as c1:
            ref = TransferRef("xfer-tp", "prefill-node", 5.0)
            reply = c0.lookup(keys0, transfer=ref, ranks=[(RANK1.digest(), keys1)])
            assert reply.prefix == 3 and reply.tiers == ["peer"] * 3
            for client, keys in ((c0, keys0), (c1, keys1)):
                leases = client.read(keys, wait=5.0)
                assert all(x is not None for x in leases)
                client.release([x for x in leases if x is not None])
        assert source.located == []  # no directory round trip, for any rank
        assert sorted(source.pulled) == sorted((k, "prefill-node") for k in keys0 + keys1)
        assert source.done == [("prefill-node", "xfer-tp")]  # once, after both ranks' chunks

    asyncio.run(serve({"pull_delay": 0.05}, scenario))


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        ("rank1", "'ranks' must be a list"),
        ([[b"n" * 16]], "ranks[0] must be a [namespace, keys] pair"),
        ([[b"short", [b"k" * 16]]], "ranks[0]'s namespace must be a 16-byte namespace id"),
        ([[b"n" * 16, [b"k" * 16, b"k" * 16]]], "ranks[0] has 2 keys; one per key"),
        ([[b"n" * 16, [b"k" * 15]]], "key 0 is 15 bytes"),
        ([[b"n" * 16, [b"k" * 16]]] * 65, "at most 64"),
    ],
)
def test_a_malformed_ranks_field_gets_a_clear_error(ranks: object, message: str) -> None:
    def scenario(path: str, source: ScriptedSource, store: Store, loop: object) -> None:
        with AgentClient(path) as c:
            with pytest.raises(ProtocolError, match=re.escape(message)):
                c._call(Op.LOOKUP, {"keys": [b"L" * 16], "ranks": ranks})
            assert c.lookup([b"L" * 16]).tiers == [None]  # the connection still serves

    asyncio.run(serve({}, scenario))


def test_a_closed_connection_is_freed_without_the_cycle_collector() -> None:
    """An engine connection that ends must be freed by reference counting alone: held in
    a reference cycle it waits for a full collection, which a long-lived agent runs
    seldom; the soak's steady agent kept ~5 MiB of closed connections that way."""

    def scenario(path: str, source: ScriptedSource, store: Store, loop: object) -> None:
        with AgentClient(path) as c:
            assert c.put(b"L" * 16, b"local")
            c.lookup([b"L" * 16, b"M" * 16])

    async def main() -> None:
        refs: list[weakref.ref[object]] = []
        real = LocalServer._new_connection

        def spy(self: LocalServer) -> asyncio.Protocol:
            conn = real(self)
            refs.append(weakref.ref(conn))
            return conn

        LocalServer._new_connection = spy  # type: ignore[method-assign]
        try:
            await serve({}, scenario)
        finally:
            LocalServer._new_connection = real  # type: ignore[method-assign]
        await asyncio.sleep(0.05)
        assert refs, "no connection was made"
        alive = [r() for r in refs if r() is not None]
        assert not alive, [type(x).__name__ for x in gc.get_referrers(*alive)]

    run_without_cycle_collector(main)
