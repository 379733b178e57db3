"""TCP transport (the default): raw non-blocking sockets, optional TLS.

Works under uvloop and stock asyncio. Without TLS the wire is ``SocketWire``
(``sock_recv_into`` / ``sock_sendall``); with TLS, or ``io="protocol"``, it is
``ProtocolWire`` (a ``BufferedProtocol`` receiving into the destination buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Literal

from meshkv.errors import ConfigError, DeadlineExceeded, TransportError

from .base import (
    Alloc,
    Connection,
    Handler,
    Listener,
    Transport,
    TransportConfig,
    TransportStats,
    format_address,
    parse_address,
)
from .session import SessionListener, SessionSet
from .stream import ProtocolWire, SocketWire, StreamWire

logger = logging.getLogger(__name__)

LISTEN_BACKLOG = 128


@dataclass(slots=True)
class TcpOptions:
    """TCP-specific settings."""

    io: Literal["socket", "protocol"] = "socket"
    """Receive path for plain TCP: ``sock_recv_into`` ("socket") or a BufferedProtocol."""
    server_ssl: ssl.SSLContext | None = None
    """TLS context for accepted connections (None: plain TCP)."""
    client_ssl: ssl.SSLContext | None = None
    """TLS context for outgoing connections (None: plain TCP)."""
    server_hostname: str | None = None
    """Name to check the server certificate against (default: the host connected to)."""
    socket_buffer_bytes: int | None = None
    """SO_SNDBUF / SO_RCVBUF per socket. None keeps the kernel's autotuning, which grows
    the receive buffer past what an explicit size may (``net.core.rmem_max``)."""

    def __post_init__(self) -> None:
        if self.io not in ("socket", "protocol"):
            raise ConfigError(f"tcp: io must be 'socket' or 'protocol', got {self.io!r}")


def _tune(sock: socket.socket, buffer_bytes: int | None) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)


class _TcpListener(SessionListener):
    def __init__(
        self,
        transport: TcpTransport,
        sock: socket.socket,
        handler: Handler,
        alloc: Alloc | None,
    ) -> None:
        host, port = sock.getsockname()[:2]
        super().__init__(
            format_address(host, port),
            "tcp",
            transport.config,
            transport.stats,
            handler,
            alloc,
        )
        self._transport = transport
        self._sock = sock
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except OSError as exc:  # e.g. EMFILE: keep serving, but do not spin
                logger.warning("accept on %s failed: %s", self.address, exc)
                await asyncio.sleep(0.1)
                continue
            remote = format_address(addr[0], addr[1])
            try:
                wire = await self._transport._wrap(conn, remote, server_side=True)
            except (OSError, TransportError, TimeoutError) as exc:
                self._stats.auth_failures += 1
                logger.warning("TLS with %s failed: %s", remote, exc)
                conn.close()
                continue
            self.accept(wire)

    async def _stop_accepting(self) -> None:
        self._accepting.cancel()
        await asyncio.gather(self._accepting, return_exceptions=True)
        self._sock.close()


class TcpTransport(Transport):
    """Peer transport over TCP."""

    name = "tcp"

    def __init__(self, config: TransportConfig, options: TcpOptions | None = None) -> None:
        self.config = config
        self.options = options or TcpOptions()
        self.stats = TransportStats()
        self._sessions = SessionSet()

    async def listen(
        self, host: str, port: int, handler: Handler, *, alloc: Alloc | None = None
    ) -> Listener:
        try:
            sock = socket.create_server((host, port), backlog=LISTEN_BACKLOG)
        except OSError as exc:
            raise TransportError(f"cannot listen on {host}:{port}: {exc}") from exc
        sock.setblocking(False)
        return _TcpListener(self, sock, handler, alloc)

    async def connect(
        self, address: str, deadline: float, *, handler: Handler | None = None
    ) -> Connection:
        host, port = parse_address(address)
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout_at(deadline):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                family, type_, proto, _, sockaddr = infos[0]
                sock = socket.socket(family, type_, proto)
                sock.setblocking(False)
                await loop.sock_connect(sock, sockaddr)
                wire = await self._wrap(sock, address, server_side=False, host=host)
        except TimeoutError:
            if sock is not None:
                sock.close()
            raise DeadlineExceeded(f"connecting to {address} passed its deadline") from None
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise TransportError(f"cannot connect to {address}: {exc}") from exc
        return await self._sessions.open_client(
            wire, self.name, self.config, self.stats, deadline, handler
        )

    async def close(self) -> None:
        await self._sessions.close_all()

    async def _wrap(
        self, sock: socket.socket, remote: str, *, server_side: bool, host: str | None = None
    ) -> StreamWire:
        _tune(sock, self.options.socket_buffer_bytes)
        limits = (self.config.max_header_bytes, self.config.max_payload_bytes)
        ctx = self.options.server_ssl if server_side else self.options.client_ssl
        if ctx is None and self.options.io == "socket":
            return SocketWire(sock, remote, *limits)
        loop = asyncio.get_running_loop()
        receiver = ProtocolWire.protocol()
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                if server_side:
                    transport, _ = await loop.connect_accepted_socket(
                        lambda: receiver, sock, ssl=ctx
                    )
                else:
                    hostname = self.options.server_hostname or host if ctx else None
                    transport, _ = await loop.create_connection(
                        lambda: receiver, sock=sock, ssl=ctx, server_hostname=hostname
                    )
        except ssl.SSLError as exc:
            with contextlib.suppress(OSError):
                sock.close()
            raise TransportError(f"TLS handshake with {remote} failed: {exc}") from exc
        return ProtocolWire(transport, receiver, remote, *limits)
