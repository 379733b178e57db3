"""The mesh's shell parts on their own: each against a fake of its seam (``NodeView``,
``PeerDelegate``) plus the real in-memory transport, a real ``Store`` and a real peer
server on the other end. No ``MeshNode``, no membership: what each part does with what it
is given.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from meshkv.chunk import ChunkKey, Namespace, NamespaceId, RecordHeader, payload_checksum
from meshkv.errors import ProtocolError
from meshkv.mesh import messages as mm
from meshkv.mesh.fetch import Fetcher
from meshkv.mesh.peer_server import PeerServer
from meshkv.mesh.pusher import Pusher
from meshkv.puller import Puller
from meshkv.store import Store, Tier
from meshkv.transport import Faults, MemoryNetwork, MemoryTransport, MsgKind, TransportConfig
from meshkv.transport.base import Connection, ConnectionPool
from tests.helpers.stores import store_config

SECRET = b"mesh-shell-test-secret-0123456789"
NS: NamespaceId = Namespace(model="shell").digest()


def run(main: Callable[[], Awaitable[None]], limit: float = 20.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(limit):
            await main()

    asyncio.run(bounded())


@dataclass
class FakeDelegate:
    """The ``PeerDelegate`` a peer server hands decoded messages to."""

    node_id: str
    holders: dict[bytes, tuple[str, ...]] = field(default_factory=dict)
    not_held_keys: list[ChunkKey] = field(default_factory=list)
    done: list[tuple[str, str]] = field(default_factory=list)
    renewed: list[tuple[str, list[str], float]] = field(default_factory=list)
    membership: list[mm.Message] = field(default_factory=list)
    checksum_failures: int = 0

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def on_membership(self, sender: str, src: str, msg: mm.Message) -> None:
        self.membership.append(msg)

    def on_directory(self, src: str, msg: mm.Announce | mm.Handoff) -> None:
        pass

    def holders_here(self, keys: Sequence[bytes]) -> tuple[tuple[str, ...], ...]:
        return tuple(self.holders.get(bytes(k), ()) for k in keys)

    def not_held(self, key: ChunkKey) -> None:
        self.not_held_keys.append(key)

    def own_stats(self) -> dict[str, Any]:
        return {"chunks": 0}

    def transfer_done(self, consumer: str, transfer_id: str) -> None:
        self.done.append((consumer, transfer_id))

    def transfer_renew(self, consumer: str, transfer_ids: Sequence[str], seconds: float) -> None:
        self.renewed.append((consumer, list(transfer_ids), seconds))

    def count_checksum_failure(self) -> None:
        self.checksum_failures += 1


class FakeView:
    """The ``NodeView`` a fetcher or pusher is given: a fixed ring and addresses."""

    def __init__(self, node_id: str, transport: MemoryTransport, peers: dict[str, str]) -> None:
        self.node_id = node_id
        self.peers = peers
        self.dead: set[str] = set()
        self.home = "b"
        self.next: list[str] = ["b"]
        self._pool = ConnectionPool(transport, 4)

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def is_alive(self, node: str) -> bool:
        return node not in self.dead

    def address_of(self, node: str) -> str | None:
        return self.peers.get(node)

    def homes(self, keys: Sequence[ChunkKey]) -> list[str]:
        return [self.home] * len(keys)

    def home_of(self, key: ChunkKey) -> str:
        return self.home

    def successors(self, key: ChunkKey, count: int) -> list[str]:
        return self.next[:count]

    async def connection(self, address: str, deadline: float) -> Connection:
        return await self._pool.get(address, deadline)

    async def lookup_at(
        self, home: str, keys: Sequence[ChunkKey], deadline: float
    ) -> tuple[tuple[str, ...], ...]:
        conn = await self.connection(self.peers[home], deadline)
        request = mm.Lookup(1, self.node_id, tuple(bytes(k) for k in keys))
        reply = await conn.request(MsgKind.DIR_LOOKUP, {"m": request.to_wire()}, deadline=deadline)
        answer = mm.decode(reply.header["m"])
        assert isinstance(answer, mm.LookupReply)
        return answer.holders

    async def close(self) -> None:
        await self._pool.close()


@dataclass
class Peer:
    """Node "b": a real store and peer server on the memory network."""

    store: Store
    puller: Puller
    server: PeerServer
    delegate: FakeDelegate


@dataclass
class World:
    network: MemoryNetwork
    a_store: Store
    view: FakeView
    b: Peer


@asynccontextmanager
async def world(faults: Faults | None = None, ssd: str | None = None) -> AsyncIterator[World]:
    network = MemoryNetwork(seed=3, faults=faults)
    a_store = Store(store_config(cpu_bytes=64 << 20, prefault=False))
    b_store = Store(store_config(cpu_bytes=64 << 20, prefault=False, ssd_dir=ssd, ssd_fsync=False))
    await a_store.start()
    await b_store.start()
    b_puller = Puller(b_store)
    delegate = FakeDelegate("b")
    server = PeerServer(delegate, b_store, b_puller)
    b_transport = MemoryTransport(network, TransportConfig(SECRET, "b"), "b")
    listener = await b_transport.listen("b", 7000, server.handle, alloc=server.alloc)
    a_transport = MemoryTransport(network, TransportConfig(SECRET, "a"), "a")
    view = FakeView("a", a_transport, {"b": "b:7000"})
    try:
        yield World(network, a_store, view, Peer(b_store, b_puller, server, delegate))
    finally:
        loop = asyncio.get_running_loop()
        await view.close()
        await listener.close()
        await a_transport.close()
        await b_transport.close()
        await b_puller.close()
        for store in (a_store, b_store):
            await store.close(loop.time() + 2)


def put(store: Store, data: bytes, owner: int = 7) -> ChunkKey:
    key = ChunkKey(os.urandom(16))
    slot = store.reserve(NS, key, len(data), owner)
    assert slot is not None
    store.payload(slot)[:] = data
    store.commit(NS, key, owner, 256, payload_checksum(data))
    return key


async def read(store: Store, key: ChunkKey) -> bytes | None:
    (pin,) = await store.read(NS, [key], 9, 5.0)
    if pin is None:
        return None
    try:
        return bytes(store.payload(pin.slot))
    finally:
        store.release([pin.lease_id], 9)


def soon(seconds: float = 2.0) -> float:
    return asyncio.get_running_loop().time() + seconds


# --- Fetcher ----------------------------------------------------------------------------


def test_fetcher_pull_lands_verified_bytes_in_the_arena() -> None:
    async def main() -> None:
        async with world() as w:
            data = os.urandom(1 << 20)
            key = put(w.b.store, data)
            fetcher = Fetcher(w.view, w.a_store, holder_timeout_s=1.0)
            assert await fetcher.pull(NS, key, "b", soon(), last=True) is None
            assert await read(w.a_store, key) == data
            assert fetcher.stats.pulls_ok == 1 and fetcher.stats.pull_bytes == len(data)
            assert fetcher.stats.latency.count == 1 and fetcher.load["b"] == 0

    run(main)


def test_fetcher_failures_have_causes_and_leave_no_reservation() -> None:
    async def main() -> None:
        async with world() as w:
            fetcher = Fetcher(w.view, w.a_store, holder_timeout_s=0.3)
            missing = ChunkKey(os.urandom(16))
            assert await fetcher.pull(NS, missing, "b", soon(), last=True) == "stale"
            assert w.b.delegate.not_held_keys == [missing]  # b corrects the key's home
            assert await fetcher.pull(NS, missing, "zz", soon(), last=True) == "dead"
            key = put(w.b.store, os.urandom(64 << 10))
            w.network.partition(["a"], ["b"])
            cause = await fetcher.pull(NS, key, "b", soon(0.5), last=False)
            assert cause in ("timeout", "transport")
            w.network.heal()
            assert fetcher.stats.failures == {"stale": 1, "dead": 1, cause: 1}
            assert w.a_store.snapshot().reservations_open == 0  # every slot given back

    run(main)


def test_fetcher_rejects_corrupt_bytes() -> None:
    async def main() -> None:
        async with world(Faults(corrupt=1.0)) as w:
            key = put(w.b.store, os.urandom(256 << 10))
            fetcher = Fetcher(w.view, w.a_store, holder_timeout_s=1.0)
            assert await fetcher.pull(NS, key, "b", soon(), last=True) == "checksum"
            assert w.a_store.lookup(NS, [key]) == [None]  # never visible
            assert w.a_store.snapshot().reservations_open == 0

    run(main)


def test_fetcher_cancelled_while_verifying_gives_its_slot_back() -> None:
    # A large payload is verified in the hash pool, an await during which the pull can be
    # cancelled (its flight's deadline): the reserved slot must not stay reserved.
    async def main() -> None:
        async with world() as w:
            key = put(w.b.store, os.urandom(1 << 20))
            fetcher = Fetcher(w.view, w.a_store, holder_timeout_s=1.0)
            verifying = asyncio.Event()

            async def hash_never_answers(payload: memoryview, *, inline: bool = False) -> int:
                verifying.set()
                await asyncio.Event().wait()
                raise AssertionError("unreachable")

            w.a_store.hash = hash_never_answers  # type: ignore[method-assign]
            task = asyncio.create_task(fetcher.pull(NS, key, "b", soon(), last=True))
            async with asyncio.timeout(5):
                await verifying.wait()
            assert w.a_store.snapshot().reservations_open == 1  # received, being verified
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert w.a_store.snapshot().reservations_open == 0
            assert w.a_store.lookup(NS, [key]) == [None]  # never visible unverified

    run(main)


def test_fetcher_locate_asks_the_home_and_drops_self_and_the_dead() -> None:
    async def main() -> None:
        async with world() as w:
            k1, k2, k3 = (ChunkKey(os.urandom(16)) for _ in range(3))
            w.b.delegate.holders = {k1: ("b", "a"), k2: ("c",), k3: ()}
            fetcher = Fetcher(w.view, w.a_store, holder_timeout_s=1.0)
            w.view.dead.add("c")
            assert await fetcher.locate(NS, [k1, k2, k3], soon()) == {k1: ("b",)}
            w.network.partition(["a"], ["b"])
            assert await fetcher.locate(NS, [k1], soon(0.3)) == {}
            assert fetcher.stats.failures["lookup"] == 1
            w.network.heal()
            fetcher.transfer_done("b", "t-1")  # an acknowledged request to the producer
            for _ in range(100):
                if w.b.delegate.done:
                    break
                await asyncio.sleep(0.01)
            assert w.b.delegate.done == [("a", "t-1")]
            await fetcher.close()

    run(main)


def test_fetcher_skips_a_holder_that_just_said_not_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The home keeps handing out a stale holder until the holder's correction lands; a
    second lookup right behind the failed pull must not send this node there again."""
    from meshkv.mesh import fetch

    monkeypatch.setattr(fetch, "NOT_FOUND_MEMORY_S", 1.0)  # long enough for a loaded CI
    monkeypatch.setattr(fetch, "NOT_FOUND_MEMORY_MAX", 2)

    async def main() -> None:
        async with world() as w:
            keys = [ChunkKey(os.urandom(16)) for _ in range(3)]
            w.b.delegate.holders = {k: ("b",) for k in keys}  # b holds none of them
            fetcher = Fetcher(w.view, w.a_store, holder_timeout_s=1.0)
            assert await fetcher.locate(NS, keys[:1], soon()) == {keys[0]: ("b",)}
            assert await fetcher.pull(NS, keys[0], "b", soon(), last=True) == "stale"
            assert await fetcher.locate(NS, keys, soon()) == {k: ("b",) for k in keys[1:]}
            for key in keys[1:]:  # two more answers: the memory keeps the newest two
                assert await fetcher.pull(NS, key, "b", soon(), last=True) == "stale"
            assert await fetcher.locate(NS, keys, soon()) == {keys[0]: ("b",)}
            await asyncio.sleep(1.05)  # remembered for a while only: the home decides again
            assert await fetcher.locate(NS, keys, soon()) == {k: ("b",) for k in keys}
            assert fetcher.stats.failures["stale"] == 3

    run(main)


# --- Pusher -----------------------------------------------------------------------------


def test_concurrent_transfer_pushes_all_land_intact() -> None:
    """Several workers push at once on the pooled connections; each payload must meet its
    own record on the receiver (a shared push id once mixed them up)."""

    async def main() -> None:
        async with world() as w:
            blobs = {put(w.a_store, os.urandom(512 << 10)): None for _ in range(12)}
            keys = list(blobs)
            pusher = Pusher(w.view, w.a_store, replicas=1, timeout_s=5.0)
            pusher.push(NS, keys, "b")
            for _ in range(200):
                if pusher.stats.pushed == len(keys):
                    break
                await asyncio.sleep(0.02)
            assert pusher.stats.pushed == len(keys) and pusher.stats.transfer_pushed == len(keys)
            for key in keys:
                assert await read(w.b.store, key) == await read(w.a_store, key)
            assert w.b.delegate.checksum_failures == 0
            assert w.a_store.snapshot().leases_open == 0  # push pins released
            await pusher.close()

    run(main)


def test_replication_goes_to_successors_only_for_engine_commits() -> None:
    async def main() -> None:
        async with world() as w:
            pusher = Pusher(w.view, w.a_store, replicas=2, timeout_s=5.0)
            key = put(w.a_store, os.urandom(128 << 10))
            pusher.replicate(key)
            gone = ChunkKey(os.urandom(16))
            pusher.replicate(gone)
            for _ in range(200):
                if pusher.stats.pushed == 1 and pusher.stats.failures["gone"] == 1:
                    break
                await asyncio.sleep(0.02)
            assert pusher.stats.pushed == 1 and pusher.stats.failures["gone"] == 1
            assert w.b.store.lookup(NS, [key]) == [Tier.CPU]
            single = Pusher(w.view, w.a_store, replicas=1, timeout_s=5.0)
            single.replicate(put(w.a_store, b"x" * 4096))  # R = 1: nothing to copy
            assert single.queued == 0
            await pusher.close()

    run(main)


# --- PeerServer -------------------------------------------------------------------------


def test_peer_server_promotes_from_ssd_before_serving(tmp_path: Any) -> None:
    async def main() -> None:
        async with world(ssd=str(tmp_path)) as w:
            data = os.urandom(256 << 10)
            key = put(w.b.store, data)
            entry = w.b.store.cpu.get(key)
            assert entry is not None
            await w.b.store.close(soon())  # persists to SSD ...
            store = Store(store_config(cpu_bytes=64 << 20, prefault=False, ssd_dir=str(tmp_path)))
            await store.start()  # ... and a fresh store finds it there only
            w.b.store = store
            puller = Puller(store)
            server = PeerServer(w.b.delegate, store, puller)
            transport = MemoryTransport(w.network, TransportConfig(SECRET, "b2"), "b2")
            listener = await transport.listen("b2", 7000, server.handle, alloc=server.alloc)
            w.view.peers["b2"] = "b2:7000"
            try:
                assert store.lookup(NS, [key]) == [Tier.SSD]
                fetcher = Fetcher(w.view, w.a_store, holder_timeout_s=1.0)
                assert await fetcher.pull(NS, key, "b2", soon(), last=True) is None
                assert await read(w.a_store, key) == data
                assert puller.stats.by_way["ssd"] == 1
            finally:
                await listener.close()
                await transport.close()
                await puller.close()
                await store.close(soon())

    run(main)


def test_peer_server_waits_for_a_commit_in_progress() -> None:
    """The decode side asks before the prefill engine's commit has landed: with ``wait``
    the producer answers once the commit is there, not 'not found'."""

    async def main() -> None:
        async with world() as w:
            data = os.urandom(128 << 10)
            key = ChunkKey(os.urandom(16))
            slot = w.b.store.reserve(NS, key, len(data), 5)
            assert slot is not None
            w.b.store.payload(slot)[:] = data
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, lambda: w.b.store.commit(NS, key, 5, 256, payload_checksum(data)))
            fetcher = Fetcher(w.view, w.a_store, holder_timeout_s=2.0)
            assert await fetcher.pull(NS, key, "b", soon(3.0), last=True) is None
            assert await read(w.a_store, key) == data

    run(main)


def test_peer_server_transfer_done_and_bad_frames() -> None:
    async def main() -> None:
        async with world() as w:
            conn = await w.view.connection("b:7000", soon())
            await conn.send(MsgKind.TRANSFER_DONE, {"id": "xfer-9"}, deadline=soon())
            for _ in range(100):
                if w.b.delegate.done:
                    break
                await asyncio.sleep(0.01)
            assert w.b.delegate.done == [("a", "xfer-9")]
            for header in ({"id": 5}, {}, {"id": "x" * 200}):
                with pytest.raises(ProtocolError, match="TRANSFER_DONE needs 'id'"):
                    await conn.request(MsgKind.TRANSFER_DONE, header, deadline=soon())
            with pytest.raises(ProtocolError, match="'wait' must be a number"):
                await conn.request(
                    MsgKind.CHUNK_GET,
                    {"ns": bytes(NS), "key": os.urandom(16), "wait": "soon"},
                    deadline=soon(),
                )
            assert w.b.server.stats.bad_messages == 4

    run(main)


def test_peer_server_transfer_renew_and_bad_frames() -> None:
    async def main() -> None:
        async with world() as w:
            conn = await w.view.connection("b:7000", soon())
            await conn.request(
                MsgKind.TRANSFER_RENEW, {"ids": ["x1", "x2"], "s": 30}, deadline=soon()
            )
            assert w.b.delegate.renewed == [("a", ["x1", "x2"], 30.0)]
            bad = [
                ({"s": 30}, "needs 'ids'"),
                ({"ids": [], "s": 30}, "needs 'ids'"),
                ({"ids": ["x"] * 1025, "s": 30}, "needs 'ids'"),
                ({"ids": ["x", 7], "s": 30}, "each id must be a string"),
                ({"ids": ["x" * 129], "s": 30}, "each id must be a string"),
                ({"ids": ["x"]}, "needs 's'"),
                ({"ids": ["x"], "s": True}, "needs 's'"),
                ({"ids": ["x"], "s": 0}, "must be in"),
                ({"ids": ["x"], "s": 601}, "must be in"),
                ({"ids": ["x"], "s": float("nan")}, "must be in"),
            ]
            for header, message in bad:
                with pytest.raises(ProtocolError, match=message):
                    await conn.request(MsgKind.TRANSFER_RENEW, header, deadline=soon())
            assert w.b.server.stats.bad_messages == len(bad)
            assert len(w.b.delegate.renewed) == 1  # and the connection still serves
            await conn.request(MsgKind.TRANSFER_RENEW, {"ids": ["x3"], "s": 1.5}, deadline=soon())
            assert w.b.delegate.renewed[-1] == ("a", ["x3"], 1.5)

    run(main)


def test_a_payload_on_a_request_that_takes_none_is_refused_unbuffered() -> None:
    """A peer that sends a 1 MiB payload with a lookup gets an error, the node allocates
    nothing for it, and the connection keeps serving."""

    async def main() -> None:
        async with world() as w:
            conn = await w.view.connection("b:7000", soon())
            lookup = mm.Lookup(1, "a", (bytes(16),))
            with pytest.raises(ProtocolError, match="carry no payload"):
                await conn.request(
                    MsgKind.DIR_LOOKUP,
                    {"m": lookup.to_wire()},
                    bytes(1 << 20),
                    deadline=soon(),
                )
            assert w.b.server.stats.bad_messages == 1
            reply = await conn.request(MsgKind.DIR_LOOKUP, {"m": lookup.to_wire()}, deadline=soon())
            assert isinstance(mm.decode(reply.header["m"]), mm.LookupReply)
            # A push the node will drop (no such pending record) lands in one shared sink.
            # (a record whose length disagrees with the payload's: never reserved)
            record = RecordHeader(NS, ChunkKey(bytes(16)), 16, 100, 0).pack()
            for i in range(3):
                reply = await conn.request(
                    MsgKind.CHUNK_PUSH, {"push": i, "record": record}, bytes(4096), deadline=soon()
                )
                assert reply.header == {"stored": False}
            assert len(w.b.server._sink) == 4096

    asyncio.run(main())
