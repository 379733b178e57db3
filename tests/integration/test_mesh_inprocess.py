"""Mesh nodes with real stores on an in-memory network, in one process: the fetch path's
singleflight, deadlines and next-holder logic, deterministic and fast."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from meshkv.chunk import ChunkKey, Namespace, NamespaceId, payload_checksum
from meshkv.mesh.node import MeshNode
from meshkv.mesh.options import MeshNodeConfig
from meshkv.puller import Puller, PullerConfig
from meshkv.store import Store, Tier
from meshkv.transport.base import TransportConfig
from meshkv.transport.memory import MemoryNetwork, MemoryTransport
from tests.helpers.stores import store_config

SECRET = b"in-process-mesh-secret-0123456789"
NS: NamespaceId = Namespace(model="inprocess").digest()


class Mesh(dict[str, MeshNode]):
    """The nodes by name, plus each node's puller (the agent's one path to residency)."""

    def __init__(self) -> None:
        super().__init__()
        self.pullers: dict[str, Puller] = {}

    async def lookup(self, name: str, keys: list[ChunkKey]) -> list[Tier | None]:
        """What the local channel's lookup answers on node ``name`` (starts the flights)."""
        store = self[name].store
        loop = asyncio.get_running_loop()
        return await self.pullers[name].locate(NS, keys, store.lookup(NS, keys), loop.time() + 1)

    async def fetch(self, name: str, keys: list[ChunkKey], deadline: float) -> list[bool]:
        """A lookup and a read that waits until ``deadline``: which keys are resident."""
        await self.lookup(name, keys)
        loop = asyncio.get_running_loop()
        await self.pullers[name].resident(NS, keys, max(0.0, deadline - loop.time()))
        return [t == Tier.CPU for t in self[name].store.lookup(NS, keys)]


@asynccontextmanager
async def mesh(
    names: list[str], *, pull_timeout_s: float = 5.0, **config: object
) -> AsyncIterator[Mesh]:
    network = MemoryNetwork(seed=1)
    nodes = Mesh()
    try:
        for i, name in enumerate(names):
            store = Store(store_config(cpu_bytes=64 << 20, prefault=False))
            await store.start()
            cfg = MeshNodeConfig.from_preset(
                "local",
                listen=f"{name}:7000",
                join=(f"{names[0]}:7000",) if i else (),
                secret=SECRET,
                **config,
            )
            transport = MemoryTransport(network, TransportConfig(SECRET, name), name)
            puller = Puller(store, PullerConfig(pull_timeout_s=pull_timeout_s))
            node = MeshNode(name, cfg, store, puller, seed=i, transport=transport)
            puller.add_source(node.source)
            await node.start()
            nodes[name] = node
            nodes.pullers[name] = puller
        await until(lambda: all(len(n.ring) == len(names) for n in nodes.values()))
        yield nodes
    finally:
        loop = asyncio.get_running_loop()
        for name, node in nodes.items():
            await nodes.pullers[name].close()
            await node.close(loop.time() + 1)
            await node.store.close(loop.time() + 1)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


def put(node: MeshNode, data: bytes) -> ChunkKey:
    key = ChunkKey(os.urandom(16))
    slot = node.store.reserve(NS, key, len(data), 7)
    assert slot is not None
    node.store.payload(slot)[:] = data
    node.store.commit(NS, key, 7, 256, payload_checksum(data))
    return key


async def announced(nodes: dict[str, MeshNode], key: ChunkKey, holders: set[str]) -> None:
    async def known() -> set[str]:
        reader = next(iter(nodes.values()))
        home = reader.home_of(key)
        loop = asyncio.get_running_loop()
        (found,) = await reader.lookup_at(home, [key], loop.time() + 1)
        return set(found)

    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while await known() != holders:
        assert loop.time() < end, "holders never announced"
        await asyncio.sleep(0.02)


async def read_back(node: MeshNode, key: ChunkKey) -> bytes:
    (pin,) = await node.store.read(NS, [key], 9, 5.0)
    assert pin is not None
    try:
        return bytes(node.store.payload(pin.slot))
    finally:
        node.store.release([pin.lease_id], 9)


def test_concurrent_fetches_of_one_key_pull_it_once() -> None:
    async def scenario() -> None:
        async with mesh(["a", "b", "c"]) as nodes:
            data = os.urandom(1 << 20)
            key = put(nodes["a"], data)
            await announced(nodes, key, {"a"})
            c = nodes["c"]
            loop = asyncio.get_running_loop()
            results = await asyncio.gather(
                *(nodes.fetch("c", [key], loop.time() + 5) for _ in range(5))
            )
            assert results == [[True]] * 5
            assert nodes["a"].peer_server.stats.chunks_served == 1  # singleflight
            assert c.fetcher.stats.pulls_ok == 1
            assert await read_back(c, key) == data
            # c now announces itself as a second holder
            await announced(nodes, key, {"a", "c"})

    asyncio.run(scenario())


def test_unreachable_holder_then_next_holder_within_deadline() -> None:
    async def scenario() -> None:
        async with mesh(["a", "b", "c"], holder_timeout_s=0.3) as nodes:
            data = os.urandom(256 << 10)
            key = put(nodes["a"], data)
            slot = nodes["b"].store.reserve(NS, key, len(data), 7)
            assert slot is not None
            nodes["b"].store.payload(slot)[:] = data
            nodes["b"].store.commit(NS, key, 7, 256, payload_checksum(data))
            await announced(nodes, key, {"a", "b"})
            c = nodes["c"]
            assert await nodes.lookup("c", [key]) == [Tier.PEER]  # holders known before the cut
            # a's chunk traffic goes nowhere: its peer port refuses c's new connections
            network = c.transport.network  # type: ignore[attr-defined]
            network.partition(["c"], ["a"])
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await nodes.fetch("c", [key], loop.time() + 3) == [True]
            assert loop.time() - started < 3
            assert await read_back(c, key) == data
            assert nodes["b"].peer_server.stats.chunks_served == 1
            network.heal()

    asyncio.run(scenario())


def test_no_holder_reachable_is_a_miss_by_the_deadline() -> None:
    async def scenario() -> None:
        async with mesh(["a", "c"], pull_timeout_s=1.5) as nodes:
            key = put(nodes["a"], os.urandom(64 << 10))
            await announced(nodes, key, {"a"})
            c = nodes["c"]
            assert await nodes.lookup("c", [key]) == [Tier.PEER]
            network = c.transport.network  # type: ignore[attr-defined]
            network.partition(["c"], ["a"])
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await nodes.fetch("c", [key], loop.time() + 1.5) == [False]
            assert loop.time() - started < 2.0
            failures = c.fetcher.stats.failures
            # the pull ends at the caller's deadline (a black-holed connection times out)
            await until(lambda: failures["transport"] + failures["timeout"] >= 1, 1.0)
            assert c.fetcher.stats.pulls_ok == 0
            network.heal()

    asyncio.run(scenario())


def test_replicas_land_on_ring_successors_and_are_not_pushed_on() -> None:
    async def scenario() -> None:
        async with mesh(["a", "b", "c", "d"], replicas=3) as nodes:
            data = os.urandom(512 << 10)
            key = put(nodes["a"], data)
            successors = [n for n in nodes["a"].ring.owners(key, 4) if n != "a"][:2]
            await until(
                lambda: all(nodes[n].store.lookup(NS, [key]) == [Tier.CPU] for n in successors)
            )
            for name in successors:
                assert await read_back(nodes[name], key) == data
            (other,) = set(nodes) - {"a", *successors}
            assert nodes[other].store.lookup(NS, [key]) == [None]
            assert nodes["a"].pusher.stats.pushed == 2
            assert all(nodes[n].pusher.stats.pushed == 0 for n in successors)
            await announced(nodes, key, {"a", *successors})

    asyncio.run(scenario())
