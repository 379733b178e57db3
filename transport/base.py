"""The one narrow interface between the mesh and the network.

The mesh sees three objects::

    listener = await transport.listen(host, port, handler, alloc=alloc)
    conn = await transport.connect("host:port", deadline)         # authenticated
    reply = await conn.request(MsgKind.CHUNK_GET, {"key": k}, deadline=d,
                               recv_into=lambda kind, header, n: slot_view)
    await conn.send(MsgKind.GOSSIP, {...}, deadline=d)             # one-way
    await conn.close(); await listener.close(); await transport.close()

Rules every implementation (TCP, UCX, in-memory) follows:

* **Deadlines are absolute** ``loop.time()`` values, carried through multi-step work.
  Every wait ends by its deadline with ``DeadlineExceeded`` (a ``TimeoutError``).
* **Authentication first.** ``connect`` returns only after a mutual HMAC handshake over the
  mesh secret (see ``handshake.py``); a listener hands nothing to ``handler`` before it.
* **Zero-copy payloads.** A payload to send may be any buffer (``bytes``, ``bytearray``,
  ``memoryview`` of shared memory); it is written to the network straight from that memory.
  The sender must keep it unchanged until ``request``/``send`` returns (for handler replies:
  until ``Message.on_sent`` is called). A payload to receive lands in a buffer chosen once
  the header is known: ``recv_into(kind, header, payload_len)`` for a response and
  ``alloc(peer, kind, header, payload_len)`` for an incoming request; either may return
  ``None`` to get fresh ``bytes``-like memory. The returned view must hold at least
  ``payload_len`` bytes; ``Message.payload`` is then that view cut to ``payload_len``.
* **A request that ends early never leaves a writer behind.** If a request's deadline
  passes (or its task is cancelled) while its payload is landing in the caller's buffer,
  the connection is aborted before ``request`` returns, so the buffer may be reused at once.
* **Errors.** Socket/UCX failures surface as ``TransportError`` subclasses
  (``ConnectionClosed``, ``AuthenticationFailed``); malformed frames as ``ProtocolError``
  (the connection is dropped, the listener keeps serving). A handler that raises a
  ``MeshKVError`` makes the requester raise the same class (codes travel in ERROR frames).
* **Concurrency.** Many requests may be in flight on one connection (matched by request
  id). On a byte stream (TCP) payloads of different frames do not interleave, so a pull
  queued behind a 16 MiB payload waits for it; ``ConnectionPool`` spreads requests over a
  few connections per peer when that matters.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshkv.errors import ConfigError, DeadlineExceeded

from .framing import (
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    MsgKind,
)

Buffer = bytes | bytearray | memoryview
"""Anything a payload may be sent from."""


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """Who is on the other end of an authenticated connection."""

    node_id: str
    """The peer's node id, as it proved in the handshake."""
    address: str
    """The peer's network address ("host:port"; for accepted connections, the source)."""
    protocol_version: int
    """Protocol version both sides agreed on."""
    transport: str
    """"tcp", "ucx" or "memory"."""


@dataclass(frozen=True, slots=True)
class Message:
    """One message: a kind, a msgpack-able header and an optional raw payload."""

    kind: MsgKind
    header: dict[str, Any] = field(default_factory=dict)
    payload: Buffer | None = None
    request_id: int = 0
    """Set by the transport on received messages; ignored on messages to send."""
    on_sent: Callable[[], None] | None = field(default=None, compare=False)
    """For handler replies: called once the payload has left (or failed to leave) the
    sender's buffer, e.g. to release the pin on the arena slot it was sent from."""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, MsgKind):
            raise TypeError(f"Message.kind must be a MsgKind, got {self.kind!r}")
        if not isinstance(self.header, dict):
            raise TypeError(f"Message.header must be a dict, got {type(self.header).__name__}")


Handler = Callable[[PeerInfo, Message], Awaitable[Message | None]]
"""Serves one incoming message. For a request, the returned message is the response
(``None`` answers ``ACK``); for a one-way message the result is ignored."""

Alloc = Callable[[PeerInfo, MsgKind, Mapping[str, Any], int], memoryview | None]
"""Chooses where an incoming request's payload lands: (peer, kind, header, payload_len)."""

RecvInto = Callable[[MsgKind, Mapping[str, Any], int], memoryview | None]
"""Chooses where a response payload lands: (kind, header, payload_len)."""


@dataclass(slots=True)
class TransportConfig:
    """Settings shared by every transport."""

    secret: bytes
    """The mesh secret; every peer must know it (never sent on the wire)."""
    node_id: str
    """This node's id, announced in the handshake."""
    handshake_timeout: float = 5.0
    """Seconds an accepted connection may take to authenticate before it is dropped."""
    max_header_bytes: int = MAX_HEADER_BYTES
    """Largest msgpack header accepted from a peer."""
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    """Largest payload accepted from a peer."""
    max_inflight: int = 256
    """Requests one connection may have outstanding; more wait (with their deadline)."""
    max_handlers: int = 64
    """Incoming messages handled at once per connection; the reader waits beyond that."""
    min_protocol_version: int = MIN_PROTOCOL_VERSION
    """Oldest protocol version accepted in the handshake."""
    max_protocol_version: int = PROTOCOL_VERSION
    """Newest protocol version offered in the handshake."""

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < 16:
            raise ConfigError("transport: secret must be at least 16 bytes")
        if not self.node_id or len(self.node_id) > 256:
            raise ConfigError("transport: node_id must be 1-256 characters")
        if not 0 < self.max_header_bytes <= MAX_HEADER_BYTES:
            raise ConfigError(f"transport: max_header_bytes must be in 1..{MAX_HEADER_BYTES}")
        if not 0 < self.max_payload_bytes <= MAX_PAYLOAD_BYTES:
            raise ConfigError(f"transport: max_payload_bytes must be in 1..{MAX_PAYLOAD_BYTES}")
        if self.handshake_timeout <= 0 or self.max_inflight <= 0 or self.max_handlers <= 0:
            raise ConfigError("transport: timeouts and limits must be positive")
        if not (
            MIN_PROTOCOL_VERSION
            <= self.min_protocol_version
            <= self.max_protocol_version
            <= PROTOCOL_VERSION
        ):
            raise ConfigError(
                f"transport: protocol versions must satisfy {MIN_PROTOCOL_VERSION} <= min <= "
                f"max <= {PROTOCOL_VERSION}"
            )


@dataclass(slots=True)
class TransportStats:
    """Counters of one transport (read by the metrics module)."""

    connections_opened: int = 0
    """Outgoing connections that authenticated."""
    connections_accepted: int = 0
    """Incoming connections that authenticated."""
    auth_failures: int = 0
    """Handshakes that failed (wrong secret, bad HELLO, timeout), either side."""
    protocol_errors: int = 0
    """Connections dropped for a malformed, truncated, oversized or unknown frame."""
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    """Payload bytes sent."""
    bytes_received: int = 0
    """Payload bytes received."""
    handler_errors: int = 0
    """Handlers that raised (answered with ERROR)."""
    id_conflicts: int = 0
    """Handshakes refused because the peer has this node's own id (either side)."""
    last_id_conflict: str = ""
    """The message of the latest of those (names the other agent's address)."""
    last_id_conflict_outgoing: bool = False
    """Whether this node dialled the other one in that handshake (it is the newcomer)."""

    def record_conflict(self, message: str, *, outgoing: bool) -> None:
        self.id_conflicts += 1
        self.last_id_conflict = message
        self.last_id_conflict_outgoing = outgoing


class Connection(abc.ABC):
    """An authenticated, multiplexed connection to one peer."""

    peer: PeerInfo

    @abc.abstractmethod
    async def request(
        self,
        kind: MsgKind,
        header: dict[str, Any],
        payload: Buffer | None = None,
        *,
        deadline: float,
        recv_into: RecvInto | None = None,
    ) -> Message:
        """Send a request and wait for its response (ERROR responses are raised)."""

    @abc.abstractmethod
    async def send(
        self,
        kind: MsgKind,
        header: dict[str, Any],
        payload: Buffer | None = None,
        *,
        deadline: float,
    ) -> None:
        """Send a one-way message; returns once it has left the payload buffer."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once the connection can carry no more messages."""

    @property
    @abc.abstractmethod
    def inflight(self) -> int:
        """Requests waiting for a response (used by ``ConnectionPool``)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close; outstanding requests fail with ``ConnectionClosed``."""


class Listener(abc.ABC):
    """A bound, serving endpoint."""

    address: str
    """"host:port" peers connect to (the real port when 0 was asked for)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop accepting and close every connection it accepted."""


class Transport(abc.ABC):
    """Factory of listeners and authenticated connections."""

    name: str
    config: TransportConfig
    stats: TransportStats

    @abc.abstractmethod
    async def listen(
        self, host: str, port: int, handler: Handler, *, alloc: Alloc | None = None
    ) -> Listener:
        """Serve ``handler`` on host:port (port 0 picks a free one)."""

    @abc.abstractmethod
    async def connect(
        self, address: str, deadline: float, *, handler: Handler | None = None
    ) -> Connection:
        """Connect and authenticate; ``handler`` serves requests the peer sends back."""

    async def close(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Release transport-wide resources (listeners and connections close themselves)."""


def parse_address(address: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port"; a clear ``ConfigError`` for anything else."""
    if not isinstance(address, str) or ":" not in address:
        raise ConfigError(f"bad peer address {address!r}: expected host:port")
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]:")
        if not sep:
            raise ConfigError(f"bad peer address {address!r}: expected [v6-host]:port")
        port_s = rest
    else:
        host, _, port_s = address.rpartition(":")
        if ":" in host:
            raise ConfigError(f"bad peer address {address!r}: put IPv6 hosts in brackets")
    if not host:
        raise ConfigError(f"bad peer address {address!r}: empty host")
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"bad peer address {address!r}: port is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"bad peer address {address!r}: port out of range")
    return host, port


def format_address(host: str, port: int) -> str:
    """Inverse of ``parse_address``."""
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    return f"{host}:{port}"


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline``; raises ``DeadlineExceeded`` when none are."""
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise DeadlineExceeded("deadline already passed")
    return left


class ConnectionPool:
    """A few connections per peer, so concurrent pulls do not queue behind one payload.

    ``get(address, deadline)`` returns an idle connection to the peer, opening a new one
    (up to ``per_peer``) when every open one has a request in flight; past that it returns
    the least busy. Closed connections are dropped and replaced on the next ``get``.
    """

    def __init__(
        self, transport: Transport, per_peer: int = 4, handler: Handler | None = None
    ) -> None:
        if per_peer <= 0:
            raise ConfigError("ConnectionPool: per_peer must be positive")
        self._transport = transport
        self._per_peer = per_peer
        self._handler = handler
        self._conns: dict[str, list[Connection]] = {}
        self._opening: dict[str, int] = {}

    async def get(self, address: str, deadline: float) -> Connection:
        conns = [c for c in self._conns.get(address, ()) if not c.closed]
        self._conns[address] = conns
        idle = [c for c in conns if c.inflight == 0]
        if idle:
            return idle[0]
        if conns and len(conns) + self._opening.get(address, 0) >= self._per_peer:
            return min(conns, key=lambda c: c.inflight)
        self._opening[address] = self._opening.get(address, 0) + 1
        try:
            conn = await self._transport.connect(address, deadline, handler=self._handler)
        finally:
            self._opening[address] -= 1
        self._conns.setdefault(address, []).append(conn)
        return conn

    async def close(self) -> None:
        conns = [c for cs in self._conns.values() for c in cs]
        self._conns.clear()
        for conn in conns:
            await conn.close()
