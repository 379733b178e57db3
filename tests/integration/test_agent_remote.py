"""The local server's seam to the mesh (``RemoteLookup``), with a real Store and client.

The mesh itself is replaced by a scripted ``RemoteLookup`` — the network edge — so the
local server's side of the contract is tested on its own: peer tiers extend the prefix,
``fetch`` is started for them and a ``read(wait=...)`` waits for it, and a slow or failing
mesh never holds a lookup past ``remote_lookup_timeout_s``.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from meshkv.chunk import ChunkKey, NamespaceId
from meshkv.client import AgentClient
from meshkv.errors import TransportError
from meshkv.server.local import LocalServer, LocalServerConfig
from meshkv.store import Store, Tier
from tests.helpers.stores import store_config

PEER_BYTES = b"bytes pulled from a peer" * 100


class ScriptedMesh:
    """Claims every key starting with b"P" is on a peer; ``fetch`` stores it after a delay."""

    def __init__(self, store: Store, *, lookup_delay: float = 0.0, fail: bool = False) -> None:
        self.store = store
        self.lookup_delay = lookup_delay
        self.fail = fail
        self.fetched: list[ChunkKey] = []

    async def lookup(self, ns: NamespaceId, keys: Sequence[ChunkKey]) -> list[Tier | None]:
        await asyncio.sleep(self.lookup_delay)
        if self.fail:
            raise TransportError("peer unreachable")
        return [Tier.PEER if k.startswith(b"P") else None for k in keys]

    async def fetch(self, ns: NamespaceId, keys: Sequence[ChunkKey], deadline: float) -> list[bool]:
        await asyncio.sleep(0.2)  # the pull takes a while
        for key in keys:
            slot = self.store.reserve(ns, key, len(PEER_BYTES), owner=-7)
            if slot is not None:
                self.store.payload(slot)[:] = PEER_BYTES
                self.store.commit(ns, key, -7, num_tokens=16)
            self.fetched.append(key)
        return [True] * len(keys)


async def serve(mesh_kwargs: dict[str, object], scenario: object) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mkv-remote-", dir="/tmp"))
    store = Store(store_config(cpu_bytes=64 << 20, prefault=False))
    await store.start()
    mesh = ScriptedMesh(store, **mesh_kwargs)  # type: ignore[arg-type]
    server = LocalServer(
        LocalServerConfig(str(tmp / "agent.sock"), "n1", remote_lookup_timeout_s=0.3),
        store,
        remote=mesh,
    )
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        await asyncio.to_thread(scenario, str(tmp / "agent.sock"), mesh)  # type: ignore[arg-type]
    finally:
        await server.close(loop.time() + 2)
        await store.close(loop.time() + 2)
        shutil.rmtree(tmp, ignore_errors=True)


def test_peer_chunks_extend_the_prefix_and_reads_wait_for_the_pull() -> None:
    def scenario(path: str, mesh: ScriptedMesh) -> None:
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
            assert sorted(mesh.fetched) == sorted([b"P1" * 8, b"P2" * 8])  # prefix only

    asyncio.run(serve({}, scenario))


def test_slow_or_failing_mesh_never_holds_a_lookup() -> None:
    def slow(path: str, mesh: ScriptedMesh) -> None:
        with AgentClient(path, timeout=2.0) as c:
            c.put(b"L" * 16, b"local")
            started = time.monotonic()
            reply = c.lookup([b"L" * 16, b"P1" * 8])
            assert time.monotonic() - started < 1.0
            assert reply.tiers == ["cpu", None] and reply.prefix == 1

    asyncio.run(serve({"lookup_delay": 10.0}, slow))

    def failing(path: str, mesh: ScriptedMesh) -> None:
        with AgentClient(path) as c:
            assert c.lookup([b"P1" * 8]).tiers == [None]

    asyncio.run(serve({"fail": True}, failing))
