"""The in-memory transport: same interface as TCP, and faults that do what they say."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from meshkv.errors import (
    AuthenticationFailed,
    ConfigError,
    DeadlineExceeded,
    NodeIdConflict,
    TransportError,
)
from meshkv.transport import (
    Connection,
    Faults,
    Listener,
    MemoryNetwork,
    MemoryTransport,
    Message,
    MsgKind,
    PeerInfo,
    TransportConfig,
)

SECRET = b"transport-test-secret-0123456789"


def run(main: Callable[[], Awaitable[None]], limit: float = 20.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(limit):
            await main()

    asyncio.run(bounded())


def config(node: str, secret: bytes = SECRET) -> TransportConfig:
    return TransportConfig(secret=secret, node_id=node)


def deadline(seconds: float = 2.0) -> float:
    return asyncio.get_running_loop().time() + seconds


class Recorder:
    """A handler that records what it saw and answers CHUNK_GET with bytes."""

    def __init__(self) -> None:
        self.seen: list[Message] = []

    async def __call__(self, peer: PeerInfo, msg: Message) -> Message | None:
        self.seen.append(msg)
        if msg.kind is MsgKind.CHUNK_GET:
            return Message(MsgKind.CHUNK_DATA, {"i": msg.header.get("i")}, b"D" * 4096)
        return None


async def pair(
    network: MemoryNetwork, handler: Recorder
) -> tuple[MemoryTransport, Listener, Connection]:
    server = MemoryTransport(network, config("b"), host="b")
    client = MemoryTransport(network, config("a"), host="a")
    listener = await server.listen("b", 7000, handler)
    conn = await client.connect(listener.address, deadline())
    return client, listener, conn


def test_round_trip_alloc_and_recv_into() -> None:
    async def main() -> None:
        network = MemoryNetwork(seed=1)
        arena = bytearray(8192)
        handler = Recorder()
        server = MemoryTransport(network, config("b"), host="b")
        listener = await server.listen(
            "b", 0, handler, alloc=lambda peer, kind, header, n: memoryview(arena)[:n]
        )
        client = MemoryTransport(network, config("a"), host="a")
        conn = await client.connect(listener.address, deadline())
        assert conn.peer.node_id == "b" and conn.peer.transport == "memory"
        buf = bytearray(4096)
        reply = await conn.request(
            MsgKind.CHUNK_GET,
            {"i": 1},
            deadline=deadline(),
            recv_into=lambda k, h, n: memoryview(buf),
        )
        assert reply.header == {"i": 1} and buf == b"D" * 4096
        assert isinstance(reply.payload, memoryview) and reply.payload.obj is buf
        await conn.request(MsgKind.CHUNK_PUSH, {}, b"P" * 100, deadline=deadline())
        assert handler.seen[-1].payload is not None and bytes(arena[:100]) == b"P" * 100
        with pytest.raises(TransportError, match="address in use"):
            await server.listen("b", int(listener.address.split(":")[1]), handler)
        await conn.close()
        await listener.close()
        with pytest.raises(TransportError, match="connection refused"):
            await client.connect(listener.address, deadline())

    run(main)


def test_wrong_secret_is_rejected_on_both_sides() -> None:
    async def main() -> None:
        network = MemoryNetwork()
        handler = Recorder()
        server = MemoryTransport(network, config("b"), host="b")
        listener = await server.listen("b", 1, handler)
        evil = MemoryTransport(network, config("e", secret=b"x" * 32), host="e")
        with pytest.raises(AuthenticationFailed):
            await evil.connect(listener.address, deadline())
        await asyncio.sleep(0.01)
        assert evil.stats.auth_failures == 1 and server.stats.auth_failures == 1
        assert handler.seen == []
        await listener.close()

    run(main)


def test_a_peer_with_our_own_node_id_is_refused_on_both_sides() -> None:
    async def main() -> None:
        network = MemoryNetwork()
        handler = Recorder()
        server = MemoryTransport(network, config("twin"), host="b")
        listener = await server.listen("b", 1, handler)
        twin = MemoryTransport(network, config("twin"), host="t")
        with pytest.raises(NodeIdConflict, match=r"twin.*own --node-id"):
            await twin.connect(listener.address, deadline())
        await asyncio.sleep(0.01)
        assert twin.stats.id_conflicts == 1 and server.stats.id_conflicts == 1
        assert listener.address in twin.stats.last_id_conflict
        assert "'twin'" in server.stats.last_id_conflict
        assert handler.seen == []
        other = MemoryTransport(network, config("other"), host="o")
        conn = await other.connect(listener.address, deadline())  # the listener still serves
        await conn.close()
        await listener.close()

    run(main)


def test_drop_loses_frames_and_requests_time_out() -> None:
    async def main() -> None:
        network = MemoryNetwork(seed=3)
        handler = Recorder()
        _, listener, conn = await pair(network, handler)
        network.faults = Faults(drop=1.0)
        with pytest.raises(DeadlineExceeded):
            await conn.request(MsgKind.PING, {}, deadline=deadline(0.1))
        assert network.counters.dropped == 1 and handler.seen == []
        network.faults = Faults()
        assert (await conn.request(MsgKind.PING, {}, deadline=deadline())).kind is MsgKind.ACK
        # Half the frames dropped: some requests fail, some pass, decided by the seed.
        network.faults = Faults(drop=0.5)
        outcomes = []
        for _ in range(20):
            try:
                await conn.request(MsgKind.PING, {}, deadline=deadline(0.05))
                outcomes.append(True)
            except DeadlineExceeded:
                outcomes.append(False)
        assert 0 < sum(outcomes) < 20
        await conn.close()
        await listener.close()

    run(main)


def test_same_seed_same_faults() -> None:
    async def trial() -> list[bool]:
        network = MemoryNetwork(seed=42)
        _, listener, conn = await pair(network, Recorder())
        network.faults = Faults(drop=0.3)
        outcomes = []
        for _ in range(15):
            try:
                await conn.request(MsgKind.PING, {}, deadline=deadline(0.03))
                outcomes.append(True)
            except DeadlineExceeded:
                outcomes.append(False)
        await conn.close()
        await listener.close()
        return outcomes

    results: list[list[bool]] = []

    async def main() -> None:
        results.append(await trial())
        results.append(await trial())

    run(main)
    assert results[0] == results[1] and False in results[0]


def test_delay_holds_frames_in_order() -> None:
    async def main() -> None:
        network = MemoryNetwork(seed=5)
        handler = Recorder()
        _, listener, conn = await pair(network, handler)
        network.faults = Faults(delay=(0.1, 0.1))
        loop = asyncio.get_running_loop()
        start = loop.time()
        await conn.request(MsgKind.PING, {}, deadline=deadline())
        assert 0.2 <= loop.time() - start < 1.0  # request and response each waited 0.1 s
        network.faults = Faults(delay=(0.0, 0.05))
        for i in range(10):
            await conn.send(MsgKind.GOSSIP, {"i": i}, deadline=deadline())
        await conn.request(MsgKind.PING, {}, deadline=deadline())
        gossip = [m.header["i"] for m in handler.seen if m.kind is MsgKind.GOSSIP]
        assert gossip == list(range(10))  # a link keeps its order, like a stream
        await conn.close()
        await listener.close()

    run(main)


def test_duplicate_delivers_twice_and_the_extra_response_is_ignored() -> None:
    async def main() -> None:
        network = MemoryNetwork(seed=7)
        handler = Recorder()
        _, listener, conn = await pair(network, handler)
        network.faults = Faults(duplicate=1.0)
        await conn.send(MsgKind.GOSSIP, {"n": 1}, deadline=deadline())
        reply = await conn.request(MsgKind.CHUNK_GET, {"i": 9}, deadline=deadline())
        assert reply.header == {"i": 9}
        await asyncio.sleep(0.05)
        kinds = [m.kind for m in handler.seen]
        assert kinds.count(MsgKind.GOSSIP) == 2 and kinds.count(MsgKind.CHUNK_GET) == 2
        assert network.counters.duplicated >= 3 and not conn.closed
        network.faults = Faults()
        assert (await conn.request(MsgKind.PING, {}, deadline=deadline())).kind is MsgKind.ACK
        await conn.close()
        await listener.close()

    run(main)


def test_corrupt_flips_one_payload_byte() -> None:
    async def main() -> None:
        network = MemoryNetwork(seed=11)
        handler = Recorder()
        _, listener, conn = await pair(network, handler)
        network.faults = Faults(corrupt=1.0)
        sent = bytes(range(256)) * 8
        await conn.request(MsgKind.CHUNK_PUSH, {}, sent, deadline=deadline())
        got = bytes(handler.seen[-1].payload or b"")
        assert len(got) == len(sent)
        assert sum(a != b for a, b in zip(got, sent, strict=True)) == 1
        assert network.counters.corrupted >= 1
        await conn.close()
        await listener.close()

    run(main)


def test_partition_cuts_links_and_connects_until_healed() -> None:
    async def main() -> None:
        network = MemoryNetwork(seed=13)
        handler = Recorder()
        client, listener, conn = await pair(network, handler)
        third = MemoryTransport(network, config("c"), host="c")
        network.partition({"a"}, {listener.address})
        assert network.cut("a", "b") and network.cut("b:1", "a:2") and not network.cut("c", "b")
        with pytest.raises(DeadlineExceeded):
            await conn.request(MsgKind.PING, {}, deadline=deadline(0.1))
        with pytest.raises(TransportError, match="connection refused"):
            await client.connect(listener.address, deadline())
        assert network.counters.partitioned == 1
        # Hosts outside the cut still reach b.
        other = await third.connect(listener.address, deadline())
        assert (await other.request(MsgKind.PING, {}, deadline=deadline())).kind is MsgKind.ACK
        network.heal()
        assert (await conn.request(MsgKind.PING, {}, deadline=deadline())).kind is MsgKind.ACK
        await conn.close()
        await other.close()
        await listener.close()

    run(main)


def test_drop_during_handshake_ends_connect_at_its_deadline() -> None:
    async def main() -> None:
        network = MemoryNetwork(faults=Faults(drop=1.0))
        server = MemoryTransport(network, config("b"), host="b")
        listener = await server.listen("b", 1, Recorder())
        client = MemoryTransport(network, config("a"), host="a")
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(DeadlineExceeded, match="handshake"):
            await client.connect(listener.address, start + 0.1)
        assert loop.time() - start < 0.5 and client.stats.auth_failures == 1
        await listener.close()

    run(main)


def test_fault_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="probability"):
        Faults(drop=1.5)
    with pytest.raises(ConfigError, match="delay"):
        Faults(delay=(0.2, 0.1))
    with pytest.raises(ConfigError, match="bad host"):
        MemoryTransport(MemoryNetwork(), config("a"), host="a:1")
