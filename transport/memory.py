"""In-memory transport with fault injection, for tests and simulations.

A ``MemoryNetwork`` connects ``MemoryTransport`` instances inside one process. Frames are
real encoded frames (the same framing, handshake and session code as TCP and UCX run on
top), carried through bounded per-direction queues, so a corrupted byte or a dropped HELLO
fails exactly as it would on a socket. Faults are decided per frame by one seeded RNG:

* ``drop``       — probability that a frame is lost;
* ``delay``      — (min, max) seconds added before delivery (order is kept: FIFO);
* ``duplicate``  — probability that a frame is delivered twice;
* ``corrupt``    — probability that one payload byte is flipped;
* ``partition(a, b)`` — no frame crosses between hosts of ``a`` and hosts of ``b`` (either
  direction) and new connections between them are refused, until ``heal()``.

Hosts are the host part of addresses ("node-1:7000" → "node-1"). A connecting transport
is identified by its own ``host``.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass

from meshkv.errors import ConfigError, ConnectionClosed, DeadlineExceeded, TransportError

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
from .framing import HEAD_BYTES, FrameHead, decode_head
from .session import SessionListener, SessionSet
from .wire import Payload, Wire

LINK_QUEUE = 1024
"""Frames buffered per direction of one link; senders wait (with their deadline) beyond."""


@dataclass(slots=True)
class Faults:
    """Fault probabilities applied to every frame on the network."""

    drop: float = 0.0
    """Probability that a frame is lost."""
    delay: tuple[float, float] = (0.0, 0.0)
    """Extra delivery delay in seconds, uniform in [min, max]."""
    duplicate: float = 0.0
    """Probability that a frame is delivered twice."""
    corrupt: float = 0.0
    """Probability that one byte of a frame's payload is flipped."""

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "corrupt"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"faults: {name} must be a probability")
        if not 0.0 <= self.delay[0] <= self.delay[1]:
            raise ConfigError("faults: delay must be (min, max) with 0 <= min <= max")


@dataclass(slots=True)
class FaultCounters:
    """What the network did to frames (for assertions)."""

    delivered: int = 0
    dropped: int = 0
    duplicated: int = 0
    corrupted: int = 0
    partitioned: int = 0


_Frame = tuple[float, bytes, bytes | None]  # (deliver at, head + header, payload copy)


class MemoryNetwork:
    """The shared medium: listeners by address, faults, partitions."""

    def __init__(self, seed: int = 0, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self.counters = FaultCounters()
        self._rng = random.Random(seed)
        self._listeners: dict[str, _MemoryListener] = {}
        self._ports = itertools.count(10000)
        self._cuts: set[frozenset[str]] = set()

    def partition(self, side_a: Iterable[str], side_b: Iterable[str]) -> None:
        """Cut every link between a host (or address) in ``side_a`` and one in ``side_b``."""
        hosts_a = {_host(x) for x in side_a}
        hosts_b = {_host(x) for x in side_b}
        for a in hosts_a:
            for b in hosts_b:
                if a != b:
                    self._cuts.add(frozenset((a, b)))

    def heal(self) -> None:
        """Remove every partition."""
        self._cuts.clear()

    def cut(self, host_a: str, host_b: str) -> bool:
        """True while the two hosts are partitioned from each other."""
        return frozenset((_host(host_a), _host(host_b))) in self._cuts

    def _transmit(self, src: str, dst: str, frame: bytes, payload: bytes | None) -> list[_Frame]:
        """Apply faults to one frame; returns what arrives (0, 1 or 2 copies)."""
        if self.cut(src, dst):
            self.counters.partitioned += 1
            return []
        faults = self.faults
        if faults.drop and self._rng.random() < faults.drop:
            self.counters.dropped += 1
            return []
        if payload and faults.corrupt and self._rng.random() < faults.corrupt:
            damaged = bytearray(payload)
            damaged[self._rng.randrange(len(damaged))] ^= 0xFF
            payload = bytes(damaged)
            self.counters.corrupted += 1
        delay = self._rng.uniform(*faults.delay) if faults.delay[1] else 0.0
        at = asyncio.get_running_loop().time() + delay
        copies = [(at, frame, payload)]
        if faults.duplicate and self._rng.random() < faults.duplicate:
            self.counters.duplicated += 1
            copies.append((at, frame, payload))
        self.counters.delivered += 1
        return copies


def _host(address: str) -> str:
    return parse_address(address)[0] if ":" in address else address


class MemoryWire(Wire):
    """One direction pair of an in-memory link."""

    inline_payload = True

    def __init__(
        self,
        network: MemoryNetwork,
        local: str,
        remote: str,
        inbox: asyncio.Queue[_Frame | None],
        outbox: asyncio.Queue[_Frame | None],
        max_header_bytes: int,
        max_payload_bytes: int,
    ) -> None:
        self.remote = remote
        self._network = network
        self._local = local
        self._inbox = inbox
        self._outbox = outbox
        self._max_header = max_header_bytes
        self._max_payload = max_payload_bytes
        self._payload: bytes | None = None
        self._aborted = False

    async def send_frame(self, head: bytes, header: bytes, payload: Payload | None) -> None:
        if self._aborted:
            raise ConnectionClosed(f"connection to {self.remote} is closed")
        copy = None if payload is None else bytes(payload)  # the "network" copies
        for item in self._network._transmit(self._local, self.remote, head + header, copy):
            await self._outbox.put(item)

    async def recv_head(self) -> tuple[FrameHead, bytes]:
        if self._aborted:
            raise ConnectionClosed(f"connection to {self.remote} is closed")
        item = await self._inbox.get()
        if item is None:
            self._aborted = True
            raise ConnectionClosed(f"{self.remote} closed the connection")
        at, data, payload = item
        wait = at - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = decode_head(
            data[:HEAD_BYTES],
            max_header_bytes=self._max_header,
            max_payload_bytes=self._max_payload,
        )
        self._payload = payload
        return frame, data[HEAD_BYTES:]

    async def recv_payload(self, frame: FrameHead, dest: memoryview) -> None:
        payload, self._payload = self._payload, None
        if payload is None or len(payload) != frame.payload_len:
            raise ConnectionClosed(f"{self.remote}: payload missing")
        dest[:] = payload

    async def discard_payload(self, frame: FrameHead) -> None:
        self._payload = None

    def abort(self) -> None:
        if not self._aborted:
            self._aborted = True
            for queue in (self._outbox, self._inbox):
                try:
                    queue.put_nowait(None)
                except asyncio.QueueFull:
                    # A full queue: drop its oldest frame so the end still gets through.
                    queue.get_nowait()
                    queue.put_nowait(None)

    async def close(self) -> None:
        self.abort()


class _MemoryListener(SessionListener):
    def __init__(
        self, transport: MemoryTransport, address: str, handler: Handler, alloc: Alloc | None
    ) -> None:
        super().__init__(address, "memory", transport.config, transport.stats, handler, alloc)
        self.network = transport.network
        self.config = transport.config

    async def _stop_accepting(self) -> None:
        self.network._listeners.pop(self.address, None)


class MemoryTransport(Transport):
    """A transport whose peers live in the same process, on a ``MemoryNetwork``."""

    name = "memory"

    def __init__(self, network: MemoryNetwork, config: TransportConfig, host: str) -> None:
        if not host or ":" in host:
            raise ConfigError(f"memory transport: bad host {host!r}")
        self.network = network
        self.config = config
        self.host = host
        self.stats = TransportStats()
        self._sessions = SessionSet()
        self._links = itertools.count(1)

    async def listen(
        self, host: str, port: int, handler: Handler, *, alloc: Alloc | None = None
    ) -> Listener:
        port = port or next(self.network._ports)
        address = format_address(host, port)
        if address in self.network._listeners:
            raise TransportError(f"cannot listen on {address}: address in use")
        listener = _MemoryListener(self, address, handler, alloc)
        self.network._listeners[address] = listener
        return listener

    async def connect(
        self, address: str, deadline: float, *, handler: Handler | None = None
    ) -> Connection:
        parse_address(address)
        if asyncio.get_running_loop().time() >= deadline:
            raise DeadlineExceeded(f"connecting to {address}: deadline already passed")
        listener = self.network._listeners.get(address)
        if listener is None or self.network.cut(self.host, address):
            raise TransportError(f"cannot connect to {address}: connection refused")
        to_server: asyncio.Queue[_Frame | None] = asyncio.Queue(LINK_QUEUE)
        to_client: asyncio.Queue[_Frame | None] = asyncio.Queue(LINK_QUEUE)
        local = f"{self.host}:{next(self._links)}"
        server_limits = (listener.config.max_header_bytes, listener.config.max_payload_bytes)
        limits = (self.config.max_header_bytes, self.config.max_payload_bytes)
        server_wire = MemoryWire(self.network, address, local, to_server, to_client, *server_limits)
        client_wire = MemoryWire(self.network, local, address, to_client, to_server, *limits)
        listener.accept(server_wire)
        return await self._sessions.open_client(
            client_wire, self.name, self.config, self.stats, deadline, handler
        )

    async def close(self) -> None:
        await self._sessions.close_all()
