"""The UCX transport (ucxx) on loopback: same interface and handshake as TCP."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from meshkv.errors import AuthenticationFailed, ConnectionClosed, DeadlineExceeded, NoSpace
from meshkv.transport import Message, MsgKind, PeerInfo, TransportConfig
from meshkv.transport.ucx import UcxTransport

pytestmark = pytest.mark.ucx

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

SECRET = b"transport-test-secret-0123456789"


def run(main: Callable[[], Awaitable[None]], loop: str = "asyncio", limit: float = 30.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(limit):
            await main()

    if loop == "uvloop":
        uvloop.run(bounded())
    else:
        asyncio.run(bounded())


def config(node: str, secret: bytes = SECRET) -> TransportConfig:
    return TransportConfig(secret=secret, node_id=node)


def deadline(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


def pattern(size: int, seed: int) -> bytes:
    block = bytes((i * 13 + seed) & 0xFF for i in range(256))
    return (block * (size // 256 + 1))[:size]


async def wait_for(cond: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not cond():
            await asyncio.sleep(0.01)


async def data_handler(peer: PeerInfo, msg: Message) -> Message | None:
    if msg.kind is MsgKind.CHUNK_GET:
        size = int(msg.header["size"])
        if msg.header.get("delay"):
            await asyncio.sleep(float(msg.header["delay"]))
        return Message(MsgKind.CHUNK_DATA, msg.header, pattern(size, int(msg.header["seed"])))
    return None


def test_ucxx_is_really_installed() -> None:
    # The brief for this suite: UCX tests run here, never skip.
    import ucxx

    assert ucxx.__version__


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_round_trip_into_caller_buffer(loop: str) -> None:
    async def main() -> None:
        server = UcxTransport(config("srv"))
        client = UcxTransport(config("cli"))
        listener = await server.listen("127.0.0.1", 0, data_handler)
        conn = await client.connect(listener.address, deadline())
        assert conn.peer.node_id == "srv" and conn.peer.transport == "ucx"
        for size in (0, 1, 70001, 3 << 20):
            buf = bytearray(size + 8)
            reply = await conn.request(
                MsgKind.CHUNK_GET,
                {"size": size, "seed": size & 0xFF},
                deadline=deadline(),
                recv_into=lambda k, h, n, buf=buf: memoryview(buf)[4 : 4 + n],
            )
            assert reply.kind is MsgKind.CHUNK_DATA
            if size:
                assert isinstance(reply.payload, memoryview) and reply.payload.obj is buf
                assert bytes(buf[4 : 4 + size]) == pattern(size, size & 0xFF)
                assert bytes(buf[:4]) == bytes(4) and bytes(buf[4 + size :]) == bytes(4)
            else:
                assert reply.payload is None
        await conn.close()
        await listener.close()
        assert server.stats.connections_accepted == 1

    run(main, loop)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_idle_connection_sleeps(loop: str) -> None:
    # ucxx 0.52's own "blocking" progress re-armed the worker once and polled a standing
    # receive with sleep(0): an idle connection kept this process at ~100 % of a core.
    from meshkv.transport.ucx import BlockingProgress

    async def main() -> None:
        server = UcxTransport(config("srv"))
        client = UcxTransport(config("cli"))
        listener = await server.listen("127.0.0.1", 0, data_handler)
        conn = await client.connect(listener.address, deadline())

        async def round_trip(size: int) -> None:
            reply = await conn.request(
                MsgKind.CHUNK_GET, {"size": size, "seed": 3}, deadline=deadline()
            )
            assert bytes(reply.payload or b"") == pattern(size, 3)

        await round_trip(1 << 20)
        from ucxx._lib_async import application_context as app

        driver = app.ProgressTasks[asyncio.get_running_loop()]
        assert isinstance(driver, BlockingProgress)
        cpu, wakeups = time.process_time(), driver.wakeups
        await asyncio.sleep(1.0)
        idle_cpu = time.process_time() - cpu
        assert idle_cpu < 0.25, f"idle UCX connection used {idle_cpu:.2f} s of CPU in 1 s"
        assert driver.wakeups - wakeups < 50
        await round_trip(3 << 20)  # still serving after sleeping
        await conn.close()
        await listener.close()

    run(main, loop)


def test_push_into_alloc_buffer_and_concurrent_requests() -> None:
    async def main() -> None:
        arena = bytearray(4 << 20)

        def alloc(peer: PeerInfo, kind: MsgKind, header: Any, size: int) -> memoryview:
            if header.get("full"):
                raise NoSpace("no slot")
            return memoryview(arena)[:size]

        async def handler(peer: PeerInfo, msg: Message) -> Message | None:
            if msg.kind is MsgKind.CHUNK_PUSH:
                assert isinstance(msg.payload, memoryview) and msg.payload.obj is arena
                return Message(MsgKind.ACK, {"n": msg.payload.nbytes})
            return await data_handler(peer, msg)

        server = UcxTransport(config("srv"))
        client = UcxTransport(config("cli"))
        listener = await server.listen("127.0.0.1", 0, handler, alloc=alloc)
        conn = await client.connect(listener.address, deadline())
        data = pattern(3 << 20, 7)
        reply = await conn.request(MsgKind.CHUNK_PUSH, {}, memoryview(data), deadline=deadline())
        assert reply.header == {"n": 3 << 20} and bytes(arena[: 3 << 20]) == data
        with pytest.raises(NoSpace, match="no slot"):
            await conn.request(MsgKind.CHUNK_PUSH, {"full": 1}, b"x" * 1000, deadline=deadline())

        # Responses come back out of order; each lands in its own buffer.
        bufs = [bytearray(50000 + i * 1000) for i in range(16)]

        async def one(i: int) -> None:
            header = {"size": len(bufs[i]), "seed": i, "delay": (16 - i) * 0.003}
            await conn.request(
                MsgKind.CHUNK_GET,
                header,
                deadline=deadline(10),
                recv_into=lambda k, h, n: memoryview(bufs[i]),
            )
            assert bytes(bufs[i]) == pattern(len(bufs[i]), i)

        await asyncio.gather(*(one(i) for i in range(16)))
        assert not conn.closed and server.stats.connections_accepted == 1
        await conn.close()
        await listener.close()

    run(main)


def test_wrong_secret_is_rejected_and_counted_on_both_sides() -> None:
    async def main() -> None:
        calls: list[Message] = []

        async def handler(peer: PeerInfo, msg: Message) -> Message | None:
            calls.append(msg)
            return None

        server = UcxTransport(config("srv"))
        listener = await server.listen("127.0.0.1", 0, handler)
        intruder = UcxTransport(config("evil", secret=b"not-the-mesh-secret-at-all!!"))
        with pytest.raises(AuthenticationFailed, match="failed to prove the mesh secret"):
            await intruder.connect(listener.address, deadline())
        assert intruder.stats.auth_failures == 1
        await wait_for(lambda: server.stats.auth_failures == 1)
        assert calls == [] and server.stats.connections_accepted == 0
        client = UcxTransport(config("cli"))
        conn = await client.connect(listener.address, deadline())
        assert (await conn.request(MsgKind.PING, {}, deadline=deadline())).kind is MsgKind.ACK
        assert len(calls) == 1
        await conn.close()
        await listener.close()

    run(main)


def test_deadline_and_close() -> None:
    async def main() -> None:
        server = UcxTransport(config("srv"))
        client = UcxTransport(config("cli"))
        listener = await server.listen("127.0.0.1", 0, data_handler)
        conn = await client.connect(listener.address, deadline())
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(DeadlineExceeded):
            await conn.request(
                MsgKind.CHUNK_GET, {"size": 10, "seed": 1, "delay": 1.0}, deadline=start + 0.2
            )
        assert loop.time() - start < 0.8
        reply = await conn.request(MsgKind.CHUNK_GET, {"size": 10, "seed": 2}, deadline=deadline())
        assert bytes(reply.payload or b"") == pattern(10, 2)
        pending = asyncio.ensure_future(
            conn.request(
                MsgKind.CHUNK_GET, {"size": 10, "seed": 1, "delay": 20}, deadline=deadline(20)
            )
        )
        await asyncio.sleep(0.1)
        await listener.close()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(pending, 5)
        await conn.close()

    run(main)


def test_peer_killed_mid_payload_raises_connection_closed() -> None:
    """A real UCX server process is SIGKILLed while a 256 MiB response is in flight."""
    from meshkv.bench.transport_baselines import BENCH_SECRET

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshkv.bench.transport_baselines",
            "serve-transport",
            "ucx",
            str(256 << 20),
            "asyncio",
            "socket",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())

        async def main() -> None:
            client = UcxTransport(config("cli", secret=BENCH_SECRET))
            conn = await client.connect(f"127.0.0.1:{port}", deadline(20))
            buf = bytearray(256 << 20)

            def into(kind: MsgKind, header: Any, size: int) -> memoryview:
                proc.kill()
                return memoryview(buf)

            start = time.monotonic()
            with pytest.raises(ConnectionClosed):
                await conn.request(MsgKind.CHUNK_GET, {}, deadline=deadline(20), recv_into=into)
            assert time.monotonic() - start < 5 and conn.closed
            await conn.close()

        run(main)
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_missing_ucxx_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshkv.errors import ConfigError
    from meshkv.transport import ucx as ucx_module

    monkeypatch.setitem(sys.modules, "ucxx", None)  # makes `import ucxx` fail
    with pytest.raises(ConfigError, match=r"pip install 'meshkv\[ucx\]'"):
        ucx_module.UcxTransport(config("x"))
