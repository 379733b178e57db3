"""Faults between real agents: crashes, pauses, wrong secrets, corruption, garbage frames."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshkv.bench.faultkit import CorruptingProxy
from meshkv.errors import MeshKVError, ProtocolError
from meshkv.launch import AgentProcess, free_port
from meshkv.transport.base import TransportConfig
from meshkv.transport.framing import MsgKind
from meshkv.transport.tcp import TcpTransport
from tests.helpers.mesh import (
    mesh_args,
    metric,
    peer_address,
    ring,
    start_mesh,
    states,
    wait_converged,
    wait_for,
    write_secret,
)
from tests.helpers.stores import store_config


def _holders(agent: AgentProcess, key: bytes) -> list[str]:
    return list(agent.get_json(f"/v1/owners/{key.hex()}")["holders"])


def test_holder_killed_during_pull_served_by_replica(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agents = start_mesh(agent_factory, 3, write_secret(tmp_path), replicas=2, cpu_bytes=256 << 20)
    wait_converged(agents)
    a, b, c = agents
    payloads = {os.urandom(16): os.urandom(4 << 20) for _ in range(8)}
    with a.client() as ca:
        for key, data in payloads.items():
            assert ca.put(key, data)
    keys = list(payloads)
    # every chunk is on A and on one ring successor of its key
    wait_for("two holders per key", lambda: all(len(_holders(b, k)) == 2 for k in keys))
    with c.client(timeout=10.0) as cc:
        assert cc.lookup(keys).prefix == len(keys)  # starts the pulls
        a.kill()
        started = time.monotonic()
        leases = cc.read(keys, wait=8.0)
        elapsed = time.monotonic() - started
        try:
            got = {x.key: bytes(x.view) for x in leases if x is not None}
        finally:
            cc.release([x for x in leases if x is not None])
    assert elapsed < 9.0
    assert got == payloads, f"missing {len(payloads) - len(got)}:\n{c.log()[-3000:]}"


def test_holder_killed_without_replica_is_a_clean_miss(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agents = start_mesh(agent_factory, 2, write_secret(tmp_path), cpu_bytes=256 << 20)
    wait_converged(agents)
    a, b = agents
    keys = [os.urandom(16) for _ in range(6)]
    payloads = {k: os.urandom(32 << 20) for k in keys}
    with a.client() as ca:
        for key in keys:
            assert ca.put(key, payloads[key])
    wait_for("holders announced", lambda: all(_holders(b, k) == ["a"] for k in keys))
    with b.client(timeout=10.0) as cb:
        assert cb.lookup(keys).prefix == len(keys)  # starts the pulls (192 MiB)
        a.kill()  # while they run
        started = time.monotonic()
        leases = cb.read(keys, wait=6.0)
        elapsed = time.monotonic() - started
        try:
            arrived = {k: bytes(x.view) for k, x in zip(keys, leases, strict=True) if x}
        finally:
            cb.release([x for x in leases if x is not None])
        assert elapsed < 7.0
        # what arrived before the crash is whole, byte for byte; the kill cut the rest
        assert all(arrived[k] == payloads[k] for k in arrived)
        missing = [k for k, x in zip(keys, leases, strict=True) if x is None]
        assert missing, "the kill interrupted no pull: the test did not test anything"
        # A is declared dead and leaves the ring; its directory entries are purged, so
        # lookups stop offering it
        wait_for("a declared dead", lambda: states(b).get("a") == "dead", 10.0)
        assert all("a" not in _holders(b, k) for k in keys)
        if missing:
            assert cb.lookup(missing).prefix == 0


def test_pause_shorter_than_suspicion_is_refuted(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agents = start_mesh(agent_factory, 3, write_secret(tmp_path))
    wait_converged(agents)
    a, b, c = agents
    before = {m["id"]: m["incarnation"] for m in ring(a)["members"]}["c"]
    c.sigstop()
    try:
        # resume as soon as a peer suspects it, well inside the suspicion timeout (0.6 s
        # with 3 members and the LOCAL preset): poll as fast as HTTP allows
        deadline = time.monotonic() + 5.0
        while "suspect" not in (states(a)["c"], states(b)["c"]):
            assert time.monotonic() < deadline, "c was never suspected"
    finally:
        c.sigcont()
    wait_converged(agents)
    assert states(a)["c"] == "alive"
    after = {m["id"]: m["incarnation"] for m in ring(a)["members"]}["c"]
    assert after > before  # refuted with a higher incarnation
    for agent in agents:
        dead = metric(agent, "meshkv_mesh_membership_events_total", 'kind="dead"')
        assert dead == 0, f"{agent.name} declared a member dead:\n{agent.log()[-3000:]}"
    assert (
        metric(a, "meshkv_mesh_membership_events_total", 'kind="suspect"')
        + metric(b, "meshkv_mesh_membership_events_total", 'kind="suspect"')
        >= 1
    )


def test_long_pause_is_dead_then_rejoins(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agents = start_mesh(agent_factory, 3, write_secret(tmp_path))
    wait_converged(agents)
    a, b, c = agents
    key = os.urandom(16)
    with c.client() as client:
        assert client.put(key, os.urandom(64 << 10))
    wait_for("c announced", lambda: _holders(a, key) == ["c"])
    before = {m["id"]: m["incarnation"] for m in ring(a)["members"]}["c"]
    c.sigstop()
    try:
        wait_for("c dead on a and b", lambda: states(a)["c"] == states(b)["c"] == "dead", 10.0)
        assert _holders(a, key) == [] and _holders(b, key) == []  # its chunks left
        wait_converged([a, b])
    finally:
        c.sigcont()
    wait_converged(agents)
    after = {m["id"]: m["incarnation"] for m in ring(b)["members"]}["c"]
    assert after > before
    # it re-announces what it holds to the (new) homes
    wait_for("c's chunk back in the directory", lambda: _holders(a, key) == ["c"], 10.0)


def test_wrong_secret_is_rejected_and_counted(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    (a,) = start_mesh(agent_factory, 1, write_secret(tmp_path))
    intruder = agent_factory(
        name="x",
        args=mesh_args(write_secret(tmp_path, "other.secret"), join=[peer_address(a)]),
    ).start()
    wait_for(
        "handshake failures counted",
        lambda: (
            metric(a, "meshkv_peer_handshake_failures_total") >= 1
            and metric(intruder, "meshkv_peer_handshake_failures_total") >= 1
        ),
        10.0,
    )
    time.sleep(0.5)
    assert [m["id"] for m in ring(a)["members"]] == ["a"]
    assert [m["id"] for m in ring(intruder)["members"]] == ["x"]


@pytest.fixture
def proxy_factory() -> Iterator[Callable[[tuple[str, int], int], CorruptingProxy]]:
    made: list[CorruptingProxy] = []

    def make(target: tuple[str, int], offset: int) -> CorruptingProxy:
        made.append(CorruptingProxy(target, offset=offset))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_corrupted_pull_is_counted_and_never_served(
    agent_factory: Callable[..., AgentProcess],
    tmp_path: Path,
    proxy_factory: Callable[[tuple[str, int], int], CorruptingProxy],
) -> None:
    secret = write_secret(tmp_path)
    port = free_port()
    proxy = proxy_factory(("127.0.0.1", port), offset=300_000)
    # A listens on ``port`` but tells everyone to reach it through the proxy
    a = agent_factory(
        name="a",
        args=[
            *mesh_args(secret, listen=f"127.0.0.1:{port}"),
            "--advertise",
            f"127.0.0.1:{proxy.port}",
        ],
    ).start()
    b = agent_factory(name="b", args=mesh_args(secret, join=[f"127.0.0.1:{proxy.port}"])).start()
    wait_converged([a, b])
    key = os.urandom(16)
    with a.client() as ca:
        assert ca.put(key, os.urandom(2 << 20))
    wait_for("holder announced", lambda: _holders(b, key) == ["a"])
    with b.client() as cb:
        assert cb.lookup([key]).tiers == ["peer"]
        (lease,) = cb.read([key], wait=5.0)
        assert lease is None
        assert cb.lookup([key]).tiers != ["cpu"]
    assert proxy.corrupted >= 1
    assert metric(b, "meshkv_peer_pull_failures_total", 'cause="checksum"') >= 1
    assert metric(b, "meshkv_peer_checksum_failures_total") >= 1
    assert metric(b, "meshkv_peer_pulls_total") == 0


def _raw_exchange(address: str, data: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                part = s.recv(65536)
                if not part:
                    break
                chunks.append(part)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def test_malformed_and_oversized_frames_keep_the_agent_serving(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    secret = write_secret(tmp_path)
    agents = start_mesh(agent_factory, 2, secret)
    wait_converged(agents)
    a, b = agents
    address = peer_address(a)
    # garbage before any handshake: dropped (with a reason) and counted
    reply = _raw_exchange(address, b"GET / HTTP/1.1\r\n\r\n" + os.urandom(64))
    assert b"magic" in reply or reply == b""
    # a well-formed head announcing a 1 TiB header: refused before reading it
    head = struct.pack("<4sBBHQIQ", b"MKVP", 1, 0, 1, 1, 1 << 31, 0)
    reply = _raw_exchange(address, head)
    assert b"exceeds" in reply or reply == b""
    assert (
        metric(a, "meshkv_peer_protocol_errors_total")
        + metric(a, "meshkv_peer_handshake_failures_total")
        >= 2
    )

    async def authenticated_abuse() -> list[str]:
        transport = TcpTransport(
            TransportConfig(secret=secret.read_text().strip().encode(), node_id="tester")
        )
        loop = asyncio.get_running_loop()
        errors = []
        conn = await transport.connect(address, loop.time() + 5)
        try:
            for kind, header in (
                (MsgKind.CHUNK_GET, {"ns": "not bytes", "key": b"k"}),
                (MsgKind.DIR_LOOKUP, {"m": [999]}),
                (MsgKind.DIR_LOOKUP, {}),
                (MsgKind.DIR_ANNOUNCE, {"m": [20, "a", [os.urandom(16)], []]}),  # spoofed sender
                (MsgKind.CHUNK_PUSH, {"push": 1, "record": b"short"}),
                (MsgKind.DIR_REPLY, {}),
            ):
                try:
                    await conn.request(kind, header, deadline=loop.time() + 5)
                    errors.append("accepted")
                except ProtocolError as exc:
                    errors.append(str(exc))
                except MeshKVError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            await conn.close()
            await transport.close()
        return errors

    errors = asyncio.run(authenticated_abuse())
    assert "accepted" not in errors[:5], errors
    assert "'ns' must be bytes" in errors[0]
    assert "unknown mesh message kind" in errors[1]
    assert "lacks its message field" in errors[2]
    assert "claims sender 'a'" in errors[3]
    # the agents keep serving: the mesh still moves chunks
    key = os.urandom(16)
    with a.client() as ca:
        assert ca.put(key, b"z" * 100_000)
    with b.client() as cb:
        wait_for("lookup through the mesh", lambda: cb.lookup([key]).prefix == 1)
        (lease,) = cb.read([key], wait=5.0)
        assert lease is not None and bytes(lease.view) == b"z" * 100_000
        cb.release([lease])
    assert states(b)["a"] == "alive"


def test_stale_directory_entry_is_corrected_at_the_home(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """A member announces a chunk it does not have (a lost drop); a pull from it is told
    'not found', the holder corrects the home, and the key becomes a clean miss."""
    from meshkv.chunk import ChunkKey
    from meshkv.client import DEFAULT_NAMESPACE
    from meshkv.mesh.node import MeshNode
    from meshkv.mesh.options import MeshNodeConfig
    from meshkv.puller import Puller
    from meshkv.store import Store

    secret = write_secret(tmp_path)
    (b,) = start_mesh(agent_factory, 1, secret, names=["a"])

    async def scenario() -> tuple[list[str], list[str], float, float, int]:
        store = Store(store_config(cpu_bytes=64 << 20, prefault=False))
        await store.start()
        config = MeshNodeConfig.from_preset(
            "local",
            listen="127.0.0.1:0",
            join=(peer_address(b),),
            secret=secret.read_text().strip().encode(),
        )
        node = MeshNode("ghost", config, store, Puller(store))
        await node.start()
        loop = asyncio.get_running_loop()

        async def stale_pulls() -> float:
            return await asyncio.to_thread(
                metric, b, "meshkv_peer_pull_failures_total", 'cause="stale"'
            )

        try:
            while len(node.ring) < 2:
                await asyncio.sleep(0.05)
            key = next(
                ChunkKey(k)
                for k in iter(lambda: os.urandom(16), b"")
                if node.home_of(ChunkKey(k)) == "a"
            )
            node.directory.add_local([key], loop.time())  # claims a chunk it does not store
            owners = f"/v1/owners/{key.hex()}"
            while (await asyncio.to_thread(b.get_json, owners))["holders"] != ["ghost"]:
                await asyncio.sleep(0.05)
            before = list((await asyncio.to_thread(b.get_json, owners))["holders"])

            def pull(tiers: list[str | None]) -> int:
                with b.client(namespace=DEFAULT_NAMESPACE) as client:
                    assert client.lookup([key]).tiers == tiers
                    (lease,) = client.read([key], wait=3.0)
                    assert lease is None
                    return client.lookup([key]).prefix

            # The lookup's flight is told 'not found'; the read right behind it must not
            # ask the ghost again, whether or not its correction (a message of its own) has
            # reached the home yet (the fetcher remembers the answer for a second).
            await asyncio.to_thread(pull, ["peer"])
            give_up = loop.time() + 10.0
            while (await asyncio.to_thread(b.get_json, owners))["holders"] and (
                loop.time() < give_up
            ):
                await asyncio.sleep(0.05)
            after = list((await asyncio.to_thread(b.get_json, owners))["holders"])
            stale_before = await stale_pulls()
            prefix_after = await asyncio.to_thread(pull, [None])
            stale_after = await stale_pulls()
            return before, after, stale_before, stale_after, prefix_after
        finally:
            await node.close(loop.time() + 2)
            await store.close(loop.time() + 2)

    before, after, stale_before, stale_after, prefix_after = asyncio.run(scenario())
    assert before == ["ghost"]
    assert after == []  # corrected at the home by the holder itself
    assert stale_before == 1  # the lookup's flight; the read did not ask again
    assert stale_after == stale_before  # after the correction, no more pulls from it
    assert prefix_after == 0  # a clean miss, not retried forever
