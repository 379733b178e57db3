"""The TCP transport on real loopback sockets, under stock asyncio and uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
import struct
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import pytest
import uvloop

from meshkv.errors import (
    AuthenticationFailed,
    ConnectionClosed,
    DeadlineExceeded,
    NoSpace,
    ProtocolError,
)
from meshkv.transport import (
    ConnectionPool,
    Message,
    MsgKind,
    PeerInfo,
    TcpOptions,
    TcpTransport,
    TransportConfig,
)
from meshkv.transport.framing import (
    MAGIC,
    WIRE_VERSION,
    Flags,
    encode_head,
    pack_header,
    unpack_header,
)
from meshkv.transport.handshake import client_handshake, server_handshake
from meshkv.transport.stream import SocketWire

SECRET = b"transport-test-secret-0123456789"
_HEAD = struct.Struct("<4sBBHQIQ")


def raw_head(kind: int, request_id: int, header_len: int, payload_len: int) -> bytes:
    """A frame head built by hand, so tests can send what ``encode_head`` refuses."""
    return _HEAD.pack(MAGIC, WIRE_VERSION, 0, kind, request_id, header_len, payload_len)


LOOPS = ["asyncio", "uvloop"]


def run(main: Callable[[], Awaitable[None]], loop: str = "asyncio", limit: float = 30.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(limit):
            await main()

    if loop == "uvloop":
        uvloop.run(bounded())
    else:
        asyncio.run(bounded())


def config(node: str, secret: bytes = SECRET, **kw: Any) -> TransportConfig:
    return TransportConfig(secret=secret, node_id=node, **kw)


def pattern(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(min(size, 65536))) * (size // 65536) + bytes(
        (i * 7 + seed) & 0xFF for i in range(size % 65536)
    )


def deadline(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def wait_for(cond: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not cond():
            await asyncio.sleep(0.01)


async def data_handler(peer: PeerInfo, msg: Message) -> Message | None:
    """CHUNK_GET {size, seed} -> CHUNK_DATA with that many pattern bytes."""
    if msg.kind is MsgKind.CHUNK_GET:
        size = int(msg.header["size"])
        return Message(MsgKind.CHUNK_DATA, {"size": size}, pattern(size, msg.header["seed"]))
    return None


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("io", ["socket", "protocol"])
def test_round_trip_into_caller_buffer(loop: str, io: str) -> None:
    async def main() -> None:
        server = TcpTransport(config("srv"), TcpOptions(io=io))  # type: ignore[arg-type]
        client = TcpTransport(config("cli"), TcpOptions(io=io))  # type: ignore[arg-type]
        listener = await server.listen("127.0.0.1", 0, data_handler)
        conn = await client.connect(listener.address, deadline())
        assert conn.peer.node_id == "srv" and conn.peer.transport == "tcp"
        for size in (0, 1, 65536, 70001, 3 << 20):
            buf = bytearray(size + 16)
            seen: list[tuple[MsgKind, int]] = []

            def into(
                kind: MsgKind,
                header: Any,
                n: int,
                buf: bytearray = buf,
                seen: list[tuple[MsgKind, int]] = seen,
            ) -> memoryview:
                seen.append((kind, n))
                return memoryview(buf)[8 : 8 + n]

            reply = await conn.request(
                MsgKind.CHUNK_GET, {"size": size, "seed": size}, deadline=deadline(), recv_into=into
            )
            assert reply.kind is MsgKind.CHUNK_DATA and reply.header == {"size": size}
            if size:
                assert seen == [(MsgKind.CHUNK_DATA, size)]
                assert isinstance(reply.payload, memoryview) and reply.payload.obj is buf
                assert bytes(buf[8 : 8 + size]) == pattern(size, size)
                assert bytes(buf[:8]) == bytes(8) and bytes(buf[8 + size :]) == bytes(8)
            else:
                assert seen == [] and reply.payload is None
        # Without recv_into the payload comes back as fresh memory.
        reply = await conn.request(
            MsgKind.CHUNK_GET, {"size": 1000, "seed": 3}, deadline=deadline()
        )
        assert reply.payload is not None and bytes(reply.payload) == pattern(1000, 3)
        assert server.stats.connections_accepted == 1 and client.stats.connections_opened == 1
        await conn.close()
        await listener.close()

    run(main, loop)


def test_push_from_shared_memory_lands_in_alloc_buffer() -> None:
    async def main() -> None:
        arena = bytearray(8 << 20)
        got: list[Message] = []
        sent_calls: list[str] = []

        def alloc(peer: PeerInfo, kind: MsgKind, header: Any, size: int) -> memoryview:
            offset = int(header["slot"])
            return memoryview(arena)[offset : offset + size]

        async def handler(peer: PeerInfo, msg: Message) -> Message:
            got.append(msg)
            assert peer.node_id == "cli"
            # Reply with a payload, to check on_sent fires after it left.
            return Message(
                MsgKind.ACK,
                {"n": len(msg.payload or b"")},
                b"ok" * 50000,
                on_sent=lambda: sent_calls.append("sent"),
            )

        server = TcpTransport(config("srv"))
        client = TcpTransport(config("cli"))
        listener = await server.listen("127.0.0.1", 0, handler, alloc=alloc)
        conn = await client.connect(listener.address, deadline())
        shm = shared_memory.SharedMemory(create=True, size=4 << 20, name=f"mkvt-{uuid.uuid4().hex}")
        try:
            data = pattern(4 << 20, 9)
            shm.buf[: len(data)] = data
            view = shm.buf[: len(data)]
            reply = await conn.request(
                MsgKind.CHUNK_PUSH, {"slot": 4096}, view, deadline=deadline()
            )
            view.release()
        finally:
            shm.close()
            shm.unlink()
        assert reply.header == {"n": 4 << 20} and bytes(reply.payload or b"") == b"ok" * 50000
        assert len(got) == 1 and isinstance(got[0].payload, memoryview)
        assert got[0].payload.obj is arena
        assert bytes(arena[4096 : 4096 + (4 << 20)]) == data and arena[4095] == 0
        await wait_for(lambda: sent_calls == ["sent"])
        await conn.close()
        await listener.close()

    run(main)


@pytest.mark.parametrize("loop", LOOPS)
def test_many_concurrent_requests_share_one_connection(loop: str) -> None:
    async def main() -> None:
        order: list[int] = []

        async def handler(peer: PeerInfo, msg: Message) -> Message:
            i = int(msg.header["i"])
            await asyncio.sleep((40 - i) * 0.002)  # answer in reverse order
            order.append(i)
            return Message(MsgKind.CHUNK_DATA, {"i": i}, bytes([i]) * (1000 + i * 5000))

        server = TcpTransport(config("srv"))
        client = TcpTransport(config("cli"))
        listener = await server.listen("127.0.0.1", 0, handler)
        conn = await client.connect(listener.address, deadline())
        bufs = [bytearray(1000 + i * 5000) for i in range(40)]

        async def one(i: int) -> None:
            reply = await conn.request(
                MsgKind.CHUNK_GET,
                {"i": i},
                deadline=deadline(10),
                recv_into=lambda k, h, n: memoryview(bufs[i]),
            )
            assert reply.header == {"i": i}
            assert bufs[i] == bytes([i]) * len(bufs[i])

        await asyncio.gather(*(one(i) for i in range(40)))
        assert order != sorted(order)  # responses really came back out of order
        assert server.stats.connections_accepted == 1
        assert conn.inflight == 0
        await conn.close()
        await listener.close()

    run(main, loop)


def test_wrong_secret_is_rejected_and_counted_on_both_sides() -> None:
    async def main() -> None:
        calls: list[Message] = []

        async def handler(peer: PeerInfo, msg: Message) -> Message | None:
            calls.append(msg)
            return None

        server = TcpTransport(config("srv"))
        listener = await server.listen("127.0.0.1", 0, handler)
        intruder = TcpTransport(config("evil", secret=b"not-the-mesh-secret-at-all!!"))
        with pytest.raises(AuthenticationFailed, match="failed to prove the mesh secret"):
            await intruder.connect(listener.address, deadline())
        assert intruder.stats.auth_failures == 1
        await wait_for(lambda: server.stats.auth_failures == 1)
        # A server with the wrong secret is caught by the client too.
        impostor = TcpTransport(config("fake-srv", secret=b"not-the-mesh-secret-at-all!!"))
        fake = await impostor.listen("127.0.0.1", 0, handler)
        honest = TcpTransport(config("cli"))
        with pytest.raises(AuthenticationFailed):
            await honest.connect(fake.address, deadline())
        assert honest.stats.auth_failures == 1
        await wait_for(lambda: impostor.stats.auth_failures == 1)
        assert calls == [] and server.stats.connections_accepted == 0
        # The real listener still serves a good client.
        conn = await honest.connect(listener.address, deadline())
        reply = await conn.request(MsgKind.PING, {}, deadline=deadline())
        assert reply.kind is MsgKind.ACK and len(calls) == 1
        await conn.close()
        await listener.close()
        await fake.close()

    run(main)


async def _raw_exchange(address: str, data: bytes, *, eof: bool) -> bytes:
    """Send raw bytes, then read until the server closes (bounded by a deadline)."""
    loop = asyncio.get_running_loop()
    host, port = address.rsplit(":", 1)
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, int(port)))
    received = b""
    try:
        await loop.sock_sendall(sock, data)
        if eof:  # a truncated frame: the peer stops sending mid-head
            sock.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(5):
            while chunk := await loop.sock_recv(sock, 65536):
                received += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return received


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(8),
        raw_head(MsgKind.HELLO, 0, 10, 0)[:12] + b"<eof>",  # truncated head
        raw_head(MsgKind.HELLO, 0, 1 << 20, 0),  # header too large
        raw_head(MsgKind.HELLO, 0, 0, 1 << 40),  # payload too large
        raw_head(999, 0, 0, 0),  # unknown kind
        raw_head(MsgKind.HELLO, 0, 3, 0) + b"\xc1\xc1\xc1",  # bad msgpack
        raw_head(MsgKind.CHUNK_GET, 1, 0, 0),  # a chunk request before authenticating
    ],
    ids=["http", "truncated", "big-header", "big-payload", "unknown-kind", "msgpack", "unauth"],
)
def test_malformed_frames_before_auth_drop_the_connection_only(data: bytes) -> None:
    async def main() -> None:
        calls: list[Message] = []

        async def handler(peer: PeerInfo, msg: Message) -> Message | None:
            calls.append(msg)
            return None

        server = TcpTransport(config("srv"))
        listener = await server.listen("127.0.0.1", 0, handler)
        await _raw_exchange(
            listener.address, data.removesuffix(b"<eof>"), eof=data.endswith(b"<eof>")
        )
        await wait_for(lambda: server.stats.auth_failures == 1)
        assert calls == [] and server.stats.connections_accepted == 0
        client = TcpTransport(config("cli"))
        conn = await client.connect(listener.address, deadline())
        assert (await conn.request(MsgKind.PING, {}, deadline=deadline())).kind is MsgKind.ACK
        await conn.close()
        await listener.close()

    run(main)


@pytest.mark.parametrize(
    ("head", "header"),
    [
        (raw_head(999, 1, 0, 0), b""),
        (raw_head(MsgKind.PING, 1, 2, 0), b"\x92\x01"),  # header is a list
        (raw_head(MsgKind.CHUNK_PUSH, 1, 0, 1 << 40), b""),  # oversized payload
        (b"XXXX" + raw_head(MsgKind.PING, 1, 0, 0)[4:], b""),  # bad magic
        (encode_head(MsgKind.HELLO, Flags.NONE, 1, 1, 0), b"\x80"),  # a second handshake
    ],
    ids=["unknown-kind", "bad-header", "oversized", "magic", "hello-again"],
)
def test_malformed_frames_after_auth_drop_the_connection_only(head: bytes, header: bytes) -> None:
    async def main() -> None:
        server = TcpTransport(config("srv"))
        listener = await server.listen("127.0.0.1", 0, data_handler)
        loop = asyncio.get_running_loop()
        host, port = listener.address.rsplit(":", 1)
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, int(port)))
        wire = SocketWire(sock, listener.address, 1 << 16, 1 << 30)
        await client_handshake(wire, config("raw"))
        await wait_for(lambda: server.stats.connections_accepted == 1)
        await wire.send_frame(head, header, None)
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                await wire.recv_head()
        await wire.close()
        await wait_for(lambda: server.stats.protocol_errors == 1)
        client = TcpTransport(config("cli"))
        conn = await client.connect(listener.address, deadline())
        reply = await conn.request(MsgKind.CHUNK_GET, {"size": 10, "seed": 1}, deadline=deadline())
        assert bytes(reply.payload or b"") == pattern(10, 1)
        await conn.close()
        await listener.close()

    run(main)


def test_deadlines_on_request_and_connect() -> None:
    async def main() -> None:
        async def handler(peer: PeerInfo, msg: Message) -> Message:
            if msg.header.get("slow"):
                await asyncio.sleep(1.0)
            return Message(MsgKind.CHUNK_DATA, {"slow": msg.header.get("slow")}, b"x" * 100000)

        server = TcpTransport(config("srv"))
        client = TcpTransport(config("cli"))
        listener = await server.listen("127.0.0.1", 0, handler)
        conn = await client.connect(listener.address, deadline())
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(DeadlineExceeded, match="CHUNK_GET request to srv"):
            await conn.request(MsgKind.CHUNK_GET, {"slow": True}, deadline=start + 0.2)
        assert 0.15 < loop.time() - start < 0.8
        # The connection survives; the late response is skipped when it arrives.
        reply = await conn.request(MsgKind.CHUNK_GET, {"slow": False}, deadline=deadline())
        assert reply.header == {"slow": False}
        await asyncio.sleep(1.0)
        reply = await conn.request(MsgKind.CHUNK_GET, {"slow": False}, deadline=deadline())
        assert reply.header == {"slow": False} and not conn.closed
        with pytest.raises(DeadlineExceeded):
            await conn.request(MsgKind.PING, {}, deadline=loop.time() - 1)
        # A listener that never answers the handshake: connect ends at its deadline.
        silent = socket.create_server(("127.0.0.1", 0))
        try:
            start = loop.time()
            with pytest.raises(DeadlineExceeded):
                await client.connect(f"127.0.0.1:{silent.getsockname()[1]}", start + 0.3)
            assert loop.time() - start < 1.0
        finally:
            silent.close()
        await conn.close()
        await listener.close()

    run(main)


def test_handler_errors_travel_as_their_class_and_connection_survives() -> None:
    async def main() -> None:
        def alloc(peer: PeerInfo, kind: MsgKind, header: Any, size: int) -> memoryview:
            raise NoSpace("every slot is pinned")

        async def handler(peer: PeerInfo, msg: Message) -> Message:
            if msg.kind is MsgKind.DIR_LOOKUP:
                raise ProtocolError("bad lookup")
            raise RuntimeError("boom")

        server = TcpTransport(config("srv"))
        client = TcpTransport(config("cli"))
        listener = await server.listen("127.0.0.1", 0, handler, alloc=alloc)
        conn = await client.connect(listener.address, deadline())
        with pytest.raises(NoSpace, match="every slot is pinned"):
            await conn.request(MsgKind.CHUNK_PUSH, {}, b"z" * (1 << 20), deadline=deadline())
        with pytest.raises(ProtocolError, match="bad lookup"):
            await conn.request(MsgKind.DIR_LOOKUP, {}, deadline=deadline())
        with pytest.raises(Exception, match="boom") as info:
            await conn.request(MsgKind.GOSSIP, {}, deadline=deadline())
        assert type(info.value).__name__ == "MeshKVError"
        assert not conn.closed and server.stats.handler_errors == 3
        await conn.close()
        await listener.close()

    run(main)


def test_one_way_messages_and_bidirectional_requests() -> None:
    async def main() -> None:
        got: asyncio.Queue[tuple[str, Message]] = asyncio.Queue()
        server_conns: list[PeerInfo] = []

        async def server_handler(peer: PeerInfo, msg: Message) -> Message | None:
            server_conns.append(peer)
            await got.put(("server", msg))
            return Message(MsgKind.DIR_REPLY, {"echo": msg.header})

        async def client_handler(peer: PeerInfo, msg: Message) -> Message | None:
            await got.put(("client", msg))
            return None

        server = TcpTransport(config("srv"))
        client = TcpTransport(config("cli"))
        listener = await server.listen("127.0.0.1", 0, server_handler)
        conn = await client.connect(listener.address, deadline(), handler=client_handler)
        await conn.send(MsgKind.GOSSIP, {"members": ["a", "b"]}, b"digest", deadline=deadline())
        side, msg = await asyncio.wait_for(got.get(), 5)
        assert side == "server" and msg.kind is MsgKind.GOSSIP
        assert msg.header == {"members": ["a", "b"]} and bytes(msg.payload or b"") == b"digest"
        assert server_conns[0].node_id == "cli"
        reply = await conn.request(MsgKind.DIR_LOOKUP, {"k": 1}, deadline=deadline())
        assert reply.kind is MsgKind.DIR_REPLY and reply.header == {"echo": {"k": 1}}
        await got.get()
        await conn.close()
        await listener.close()

    run(main)


def test_peer_killed_mid_payload_raises_connection_closed(tmp_path: Path) -> None:
    """A real server process is SIGKILLed while a 256 MiB response is on the wire."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshkv.bench.transport_baselines",
            "serve-transport",
            "tcp",
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
            from meshkv.bench.transport_baselines import BENCH_SECRET

            client = TcpTransport(config("cli", secret=BENCH_SECRET))
            conn = await client.connect(f"127.0.0.1:{port}", deadline(20))
            buf = bytearray(256 << 20)

            def into(kind: MsgKind, header: Any, size: int) -> memoryview:
                proc.kill()  # the response header is here; the payload is on its way
                return memoryview(buf)

            start = time.monotonic()
            with pytest.raises(ConnectionClosed, match="bytes into a 268435456-byte payload"):
                await conn.request(MsgKind.CHUNK_GET, {}, deadline=deadline(20), recv_into=into)
            assert time.monotonic() - start < 5 and conn.closed
            with pytest.raises(ConnectionClosed):
                await conn.request(MsgKind.PING, {}, deadline=deadline())
            await conn.close()

        run(main)
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_closing_the_listener_fails_pending_requests() -> None:
    async def main() -> None:
        started = asyncio.Event()

        async def handler(peer: PeerInfo, msg: Message) -> Message:
            started.set()
            await asyncio.sleep(30)
            raise AssertionError("unreachable")

        server = TcpTransport(config("srv"))
        client = TcpTransport(config("cli"))
        listener = await server.listen("127.0.0.1", 0, handler)
        conn = await client.connect(listener.address, deadline())
        pending = asyncio.ensure_future(conn.request(MsgKind.PING, {}, deadline=deadline(20)))
        await started.wait()
        await listener.close()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(pending, 5)
        await client.close()

    run(main)


def test_connection_pool_opens_more_connections_when_busy() -> None:
    async def main() -> None:
        gate = asyncio.Event()

        async def handler(peer: PeerInfo, msg: Message) -> Message | None:
            if msg.header.get("block"):
                await gate.wait()
            return None

        server = TcpTransport(config("srv"))
        client = TcpTransport(config("cli"))
        listener = await server.listen("127.0.0.1", 0, handler)
        pool = ConnectionPool(client, per_peer=2)
        first = await pool.get(listener.address, deadline())
        blocked = asyncio.ensure_future(
            first.request(MsgKind.PING, {"block": True}, deadline=deadline())
        )
        await wait_for(lambda: first.inflight == 1)
        second = await pool.get(listener.address, deadline())
        assert second is not first
        third = await pool.get(listener.address, deadline())
        assert third is second  # at the cap: the least busy one
        assert (await second.request(MsgKind.PING, {}, deadline=deadline())).kind is MsgKind.ACK
        gate.set()
        await blocked
        assert await pool.get(listener.address, deadline()) is first
        await pool.close()
        await listener.close()

    run(main)


def _make_tls(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    return server_ctx, client_ctx


@pytest.mark.parametrize("loop", LOOPS)
def test_tls_round_trip(loop: str, tmp_path: Path) -> None:
    server_ctx, client_ctx = _make_tls(tmp_path)

    async def main() -> None:
        server = TcpTransport(config("srv"), TcpOptions(server_ssl=server_ctx))
        client = TcpTransport(config("cli"), TcpOptions(client_ssl=client_ctx))
        listener = await server.listen("127.0.0.1", 0, data_handler)
        conn = await client.connect(listener.address, deadline())
        buf = bytearray(2 << 20)
        await conn.request(
            MsgKind.CHUNK_GET,
            {"size": 2 << 20, "seed": 5},
            deadline=deadline(),
            recv_into=lambda k, h, n: memoryview(buf),
        )
        assert bytes(buf) == pattern(2 << 20, 5)
        # A plain-TCP client cannot talk to the TLS listener.
        plain = TcpTransport(config("plain"))
        with pytest.raises((DeadlineExceeded, ConnectionClosed, AuthenticationFailed)):
            await plain.connect(listener.address, deadline(1.0))
        await conn.close()
        await listener.close()

    run(main, loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_deadline_mid_payload_aborts_so_the_buffer_is_free(loop: str) -> None:
    """After ``request`` gives up, nothing writes into the caller's buffer any more.

    The server is a hand-driven peer: it authenticates, answers with a header and the
    first 1000 bytes of a 1 MiB payload, stalls past the client's deadline, then sends
    the rest.
    """

    async def main() -> None:
        loop_ = asyncio.get_running_loop()
        data = pattern(1 << 20, 4)
        gave_up = asyncio.Event()
        srv = socket.create_server(("127.0.0.1", 0))
        srv.setblocking(False)

        async def stalling_peer() -> None:
            sock, addr = await loop_.sock_accept(srv)
            wire = SocketWire(sock, "client", 1 << 16, 1 << 30)
            try:
                await server_handshake(wire, config("srv"))
                frame, _ = await wire.recv_head()
                head = encode_head(
                    MsgKind.CHUNK_DATA, Flags.RESPONSE, frame.request_id, 0, len(data)
                )
                await loop_.sock_sendall(sock, head + data[:1000])
                await gave_up.wait()
                with contextlib.suppress(OSError):
                    await loop_.sock_sendall(sock, data[1000:])
            finally:
                await wire.close()

        peer = asyncio.ensure_future(stalling_peer())
        client = TcpTransport(config("cli"))
        conn = await client.connect(f"127.0.0.1:{srv.getsockname()[1]}", deadline())
        buf = bytearray(len(data))
        sizes: list[int] = []

        def into(kind: MsgKind, header: Any, size: int) -> memoryview:
            sizes.append(size)
            return memoryview(buf)

        start = loop_.time()
        with pytest.raises(DeadlineExceeded):
            await conn.request(MsgKind.CHUNK_GET, {}, deadline=start + 0.3, recv_into=into)
        assert sizes == [len(data)] and conn.closed and loop_.time() - start < 1.0
        assert bytes(buf[:1000]) == data[:1000] and buf[1000:] == bytes(len(data) - 1000)
        gave_up.set()
        await asyncio.wait_for(peer, 5)
        await asyncio.sleep(0.1)
        assert bytes(buf[:1000]) == data[:1000] and buf[1000:] == bytes(len(data) - 1000)
        await conn.close()
        srv.close()

    run(main, loop)


def test_bad_receive_buffer_fails_that_request_only() -> None:
    async def main() -> None:
        server = TcpTransport(config("srv"))
        client = TcpTransport(config("cli"))
        listener = await server.listen("127.0.0.1", 0, data_handler)
        conn = await client.connect(listener.address, deadline())
        with pytest.raises(ValueError, match="returned 10 bytes for a 100000-byte payload"):
            await conn.request(
                MsgKind.CHUNK_GET,
                {"size": 100000, "seed": 1},
                deadline=deadline(),
                recv_into=lambda k, h, n: memoryview(bytearray(10)),
            )
        with pytest.raises(TypeError, match="writable memoryview"):
            await conn.request(
                MsgKind.CHUNK_GET,
                {"size": 100, "seed": 1},
                deadline=deadline(),
                recv_into=lambda k, h, n: memoryview(bytes(100)),
            )
        reply = await conn.request(MsgKind.CHUNK_GET, {"size": 50, "seed": 2}, deadline=deadline())
        assert bytes(reply.payload or b"") == pattern(50, 2) and not conn.closed
        await conn.close()
        await listener.close()

    run(main)


def test_protocol_version_without_overlap_is_refused() -> None:
    async def main() -> None:
        server = TcpTransport(config("srv"))
        listener = await server.listen("127.0.0.1", 0, data_handler)
        loop = asyncio.get_running_loop()
        host, port = listener.address.rsplit(":", 1)
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, int(port)))
        wire = SocketWire(sock, listener.address, 1 << 16, 1 << 30)
        hello = pack_header({"node": "future", "min": 7, "max": 9, "nonce": bytes(32)})
        await wire.send_frame(encode_head(MsgKind.HELLO, Flags.NONE, 0, len(hello), 0), hello, None)
        frame, raw = await wire.recv_head()
        assert frame.kind is MsgKind.ERROR
        assert unpack_header(raw)["code"] == "version"
        assert "no common protocol version" in unpack_header(raw)["message"]
        await wire.close()
        await wait_for(lambda: server.stats.auth_failures == 1)
        await listener.close()

    run(main)


@pytest.mark.parametrize("io", ["socket", "protocol"])
def test_a_lost_connection_is_freed_without_the_cycle_collector(io: str) -> None:
    """A connection that died must be freed by reference counting alone. Kept in a cycle
    (its error's traceback holding frames that hold the session) it waits for a full
    collection, which a long-lived agent seldom runs, with its wire's buffers (0.25-1.25
    MiB): the soak's steady agent grew ~2.6 MiB a minute that way as peers restarted."""

    async def main() -> None:
        async def handler(peer: PeerInfo, msg: Message) -> Message:
            await asyncio.sleep(10.0)  # still running when the listener goes away
            return Message(MsgKind.CHUNK_DATA, {}, None)

        server = TcpTransport(config("srv"), TcpOptions(io=io))  # type: ignore[arg-type]
        client = TcpTransport(config("cli"), TcpOptions(io=io))  # type: ignore[arg-type]
        listener = await server.listen("127.0.0.1", 0, handler)
        conn = await client.connect(listener.address, deadline())
        ref = weakref.ref(conn)
        pending = asyncio.ensure_future(conn.request(MsgKind.CHUNK_GET, {}, deadline=deadline()))
        await asyncio.sleep(0.1)
        await listener.close()  # the peer goes: the request in flight fails
        with pytest.raises(ConnectionClosed):
            await pending
        await wait_for(lambda c=conn: c.closed)
        with pytest.raises(ConnectionClosed):
            await conn.request(MsgKind.PING, {}, deadline=deadline())
        del conn, pending
        await asyncio.sleep(0.05)  # the read loop's task finishes
        assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]

    gc.collect()
    gc.disable()
    try:
        run(main)
    finally:
        gc.enable()
