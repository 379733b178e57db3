"""Peer connection management for the mesh shell.

Two kinds of traffic, kept apart so that neither waits for the other:

* **control** (membership, directory announcements): small one-way messages. Each peer
  address has one connection and one bounded queue drained by one sender task; sending
  never blocks the caller. A full queue drops its oldest message (SWIM tolerates loss and
  the directory's re-announce repairs it). A peer that cannot be reached costs one failed
  connect per attempt, after which its queued messages are dropped, never retried forever.
* **data** (chunk pulls and pushes, lookups): request/response through a
  ``ConnectionPool`` with a few connections per peer, since on a byte stream a request
  queued behind a 16 MiB payload waits for it.

Every connection is authenticated by the transport's handshake before anything is sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from meshkv.errors import AuthenticationFailed, MeshKVError
from meshkv.transport.base import Connection, ConnectionPool, Handler, Transport
from meshkv.transport.framing import KIND_SINCE, MsgKind

logger = logging.getLogger(__name__)

IDLE_CLOSE_S = 60.0
"""A control link with nothing to send for this long closes its connection and its task."""


@dataclass(slots=True)
class LinkStats:
    """Counters of the control links."""

    sent: int = 0
    dropped_queue_full: int = 0
    dropped_unreachable: int = 0
    connect_failures: int = 0
    auth_failures: int = 0
    """Outgoing handshakes the peer rejected (wrong secret) or that failed."""
    dropped_old_peer: int = 0
    """Messages of a kind the peer's (older) protocol version does not know."""
    last_failure: dict[str, str] = field(default_factory=dict)
    """Why the last connection to each address failed (cleared when one succeeds)."""


class _ControlLink:
    __slots__ = ("address", "queue", "wakeup", "task", "conn")

    def __init__(self, address: str) -> None:
        self.address = address
        self.queue: collections.deque[tuple[MsgKind, dict[str, Any]]] = collections.deque()
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.conn: Connection | None = None


class PeerLinks:
    """Control queues and data connections to every peer this node talks to."""

    def __init__(
        self,
        transport: Transport,
        handler: Handler,
        *,
        connect_timeout_s: float,
        send_timeout_s: float,
        queue_limit: int,
        connections_per_peer: int,
    ) -> None:
        self._transport = transport
        self._handler = handler
        self._connect_timeout = connect_timeout_s
        self._send_timeout = send_timeout_s
        self._queue_limit = queue_limit
        self._links: dict[str, _ControlLink] = {}
        self._pool = ConnectionPool(transport, connections_per_peer, handler)
        self._closed = False
        self.stats = LinkStats()

    def send(self, address: str, kind: MsgKind, header: dict[str, Any]) -> None:
        """Queue a one-way control message to ``address`` (never blocks)."""
        if self._closed:
            return
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = _ControlLink(address)
        if len(link.queue) >= self._queue_limit:
            link.queue.popleft()
            self.stats.dropped_queue_full += 1
        link.queue.append((kind, header))
        link.wakeup.set()
        if link.task is None or link.task.done():
            link.task = asyncio.create_task(self._run(link), name=f"meshkv-link-{address}")

    async def data(self, address: str, deadline: float) -> Connection:
        """A data connection to ``address`` (opened and authenticated if needed)."""
        try:
            return await self._pool.get(address, deadline)
        except AuthenticationFailed:
            self.stats.auth_failures += 1
            raise

    def forget(self, address: str) -> None:
        """Drop the control link of a peer that left or died (its queue is discarded)."""
        link = self._links.pop(address, None)
        if link is not None:
            link.wakeup.set()  # an idle task wakes, sees it is forgotten and ends
            if link.task is not None:
                link.task.cancel()

    async def close(self) -> None:
        self._closed = True
        tasks = [link.task for link in self._links.values() if link.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for link in self._links.values():
            if link.conn is not None:
                with contextlib.suppress(MeshKVError, OSError):
                    await link.conn.close()
        self._links.clear()
        await self._pool.close()

    async def flush(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until every control queue is empty (used at leave)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end and any(link.queue for link in self._links.values()):
            await asyncio.sleep(0.01)

    async def _run(self, link: _ControlLink) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._links.get(link.address) is not link:
                    # Forgotten (the peer died or left) or replaced: ``forget`` wakes the
                    # task and cancels it. On 3.11 ``asyncio.wait_for`` loses a cancellation
                    # that arrives in the same tick as its inner future's result (which is
                    # what ``forget`` does; CPython gh-86296), so the wait below uses
                    # ``asyncio.timeout``, and this check ends the task either way (the
                    # soak found one orphaned task per peer restart before both).
                    return
                if not link.queue:
                    link.wakeup.clear()
                    try:
                        async with asyncio.timeout(IDLE_CLOSE_S):
                            await link.wakeup.wait()
                    except TimeoutError:
                        # Idle: retire this link. No await between the emptiness check and
                        # the removal, so a later ``send`` builds a fresh link and task
                        # instead of queueing behind this exiting one.
                        if not link.queue:
                            if self._links.get(link.address) is link:
                                del self._links[link.address]
                            return
                    continue
                conn = link.conn
                if conn is None or conn.closed:
                    try:
                        conn = link.conn = await self._transport.connect(
                            link.address,
                            loop.time() + self._connect_timeout,
                            handler=self._handler,
                        )
                    except (MeshKVError, OSError) as exc:
                        if isinstance(exc, AuthenticationFailed):
                            self.stats.auth_failures += 1
                        self.stats.connect_failures += 1
                        self.stats.dropped_unreachable += len(link.queue)
                        self.stats.last_failure[link.address] = str(exc) or type(exc).__name__
                        link.queue.clear()
                        logger.debug("control link to %s: %s", link.address, exc)
                        continue
                    self.stats.last_failure.pop(link.address, None)
                kind, header = link.queue.popleft()
                if KIND_SINCE.get(kind, 1) > conn.peer.protocol_version:
                    self.stats.dropped_old_peer += 1  # the peer cannot read it
                    continue
                try:
                    await conn.send(kind, header, deadline=loop.time() + self._send_timeout)
                    self.stats.sent += 1
                except (MeshKVError, OSError) as exc:
                    logger.debug("control send to %s failed: %s", link.address, exc)
                    with contextlib.suppress(MeshKVError, OSError):
                        await conn.close()
                    link.conn = None
        finally:
            if link.conn is not None:
                conn, link.conn = link.conn, None
                with contextlib.suppress(MeshKVError, OSError):
                    await asyncio.shield(conn.close())
            # A task ended by cancellation keeps its exception, whose traceback holds this
            # frame (``link``, ``conn``); with ``link.task`` pointing back at the task that
            # is a reference cycle, and the dead peer's link and connection would wait for
            # a full cycle collection. Once the task ends, nothing refers to it.
            if link.task is asyncio.current_task():
                link.task = None
