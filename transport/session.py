"""An authenticated connection: request ids, response matching, handler dispatch.

One ``Session`` sits on one ``Wire`` after the handshake. A single reader task owns the
receive side; it decodes each frame, lands its payload in the buffer chosen for it, and
either resolves the waiting request or hands the message to the handler in a task of its
own (at most ``max_handlers`` at once: the reader waits beyond that, which pushes back on
the peer instead of queueing without bound).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

from meshkv.errors import (
    ConnectionClosed,
    DeadlineExceeded,
    MeshKVError,
    NodeIdConflict,
    ProtocolError,
    TransportError,
    error_from_code,
)

from .base import (
    Alloc,
    Buffer,
    Connection,
    Handler,
    Listener,
    Message,
    PeerInfo,
    RecvInto,
    TransportConfig,
    TransportStats,
)
from .framing import (
    HANDSHAKE_KINDS,
    Flags,
    FrameHead,
    MsgKind,
    encode_head,
    pack_header,
    unpack_header,
)
from .handshake import client_handshake, server_handshake
from .wire import Wire

logger = logging.getLogger(__name__)

REPLY_TIMEOUT = 30.0
"""Seconds a handler's reply may take to leave (a peer that stops reading is dropped)."""


def as_payload(payload: Buffer | None) -> memoryview | None:
    """A flat byte view of ``payload`` without copying it (``None`` for no payload)."""
    if payload is None:
        return None
    view = memoryview(payload)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _dest_view(dest: memoryview | None, size: int, who: str) -> memoryview:
    if dest is None:
        return memoryview(bytearray(size))
    if not isinstance(dest, memoryview) or dest.readonly:
        raise TypeError(f"{who} must return a writable memoryview or None")
    if dest.format != "B" or dest.ndim != 1:
        dest = dest.cast("B")
    if dest.nbytes < size:
        raise ValueError(f"{who} returned {dest.nbytes} bytes for a {size}-byte payload")
    return dest[:size]


class _Pending:
    """A request waiting for its response."""

    __slots__ = ("future", "recv_into", "receiving")

    def __init__(self, future: asyncio.Future[Message], recv_into: RecvInto | None) -> None:
        self.future = future
        self.recv_into = recv_into
        self.receiving = False


class Session(Connection):
    """A multiplexed, authenticated connection over one ``Wire``."""

    def __init__(
        self,
        wire: Wire,
        peer: PeerInfo,
        config: TransportConfig,
        stats: TransportStats,
        *,
        handler: Handler | None = None,
        alloc: Alloc | None = None,
        on_close: Callable[[Session], None] | None = None,
    ) -> None:
        self.peer = peer
        self._wire = wire
        self._config = config
        self._stats = stats
        self._handler = handler
        self._alloc = alloc
        self._on_close = on_close
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._inflight_slots = asyncio.Semaphore(config.max_inflight)
        self._handler_slots = asyncio.Semaphore(config.max_handlers)
        self._tasks: set[asyncio.Task[None]] = set()
        self._error: TransportError | None = None
        self._graceful = False
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    # --- Connection API ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._error is not None

    @property
    def inflight(self) -> int:
        return len(self._pending)

    async def request(
        self,
        kind: MsgKind,
        header: dict[str, Any],
        payload: Buffer | None = None,
        *,
        deadline: float,
        recv_into: RecvInto | None = None,
    ) -> Message:
        self._check_open()
        pend: _Pending | None = None
        request_id = next(self._ids)
        try:
            async with asyncio.timeout_at(deadline), self._inflight_slots:
                self._check_open()
                pend = _Pending(asyncio.get_running_loop().create_future(), recv_into)
                self._pending[request_id] = pend
                await self._send(kind, Flags.NONE, request_id, header, payload)
                reply = await pend.future
        except TimeoutError as exc:
            if isinstance(exc, DeadlineExceeded):
                raise
            raise DeadlineExceeded(
                f"{kind.name} request to {self.peer.node_id} passed its deadline"
            ) from None
        finally:
            if pend is not None:
                self._pending.pop(request_id, None)
                if pend.receiving:
                    # Our caller is leaving while the payload still lands in its buffer:
                    # stop the writer before the buffer can be reused (see base.py).
                    self._abort(ConnectionClosed("request ended while its payload was arriving"))
                # The future holds the exception this frame may be raising, whose traceback
                # holds this frame: a cycle (with the session) unless the frame lets go.
                pend = None
        if reply.kind is MsgKind.ERROR:
            code = str(reply.header.get("code", "remote"))
            raise error_from_code(code, f"{self.peer.node_id}: {reply.header.get('message', '')}")
        return reply

    async def send(
        self,
        kind: MsgKind,
        header: dict[str, Any],
        payload: Buffer | None = None,
        *,
        deadline: float,
    ) -> None:
        self._check_open()
        try:
            async with asyncio.timeout_at(deadline):
                await self._send(kind, Flags.ONEWAY, next(self._ids), header, payload)
        except TimeoutError as exc:
            if isinstance(exc, DeadlineExceeded):
                raise
            raise DeadlineExceeded(
                f"{kind.name} message to {self.peer.node_id} passed its deadline"
            ) from None

    async def close(self) -> None:
        if self._error is None:
            self._error = ConnectionClosed(f"connection to {self.peer.node_id} closed")
            self._graceful = True
        if not self._reader.done() and self._reader is not asyncio.current_task():
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._wire.close()

    # --- internals --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._error is not None:
            raise ConnectionClosed(f"connection to {self.peer.node_id} is closed: {self._error}")

    async def _send(
        self,
        kind: MsgKind,
        flags: Flags,
        request_id: int,
        header: dict[str, Any],
        payload: Buffer | None,
    ) -> None:
        raw = pack_header(header)
        view = as_payload(payload)
        size = 0 if view is None else view.nbytes
        head = encode_head(kind, flags, request_id, len(raw), size)
        self._check_open()
        try:
            await self._wire.send_frame(head, raw, view if size else None)
        except TransportError as exc:
            self._abort(exc)
            raise
        self._stats.messages_sent += 1
        self._stats.bytes_sent += size

    def _abort(self, exc: TransportError) -> None:
        """Fail the connection now; the reader's exit releases the rest."""
        if self._error is None:
            self._error = _detached(exc)
            self._wire.abort()
        if not self._reader.done():
            self._reader.cancel()

    def _finish(self) -> None:
        error = self._error or ConnectionClosed("connection closed")
        self._error = error
        if not self._graceful or any(p.receiving for p in self._pending.values()):
            self._wire.abort()  # a graceful close lets the wire say goodbye instead
        for pend in self._pending.values():
            if not pend.future.done():
                pend.future.set_exception(_detached(error))
                # Nobody may be awaiting it if the requester has just left.
                pend.future.exception()
        self._pending.clear()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close(self)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_loop(self) -> None:
        try:
            while True:
                frame, raw = await self._wire.recv_head()
                header = unpack_header(raw)
                if frame.kind in HANDSHAKE_KINDS and frame.kind is not MsgKind.ERROR:
                    raise ProtocolError(f"{frame.kind.name} frame after the handshake")
                self._stats.messages_received += 1
                if frame.flags & Flags.RESPONSE:
                    await self._on_response(frame, header)
                else:
                    await self._on_message(frame, header)
        except ProtocolError as exc:
            self._stats.protocol_errors += 1
            logger.warning("dropping connection to %s: %s", self.peer.node_id, exc)
            self._error = self._error or ConnectionClosed(f"protocol error: {exc}")
        except TransportError as exc:
            logger.debug("connection to %s ended: %s", self.peer.node_id, exc)
            self._error = self._error or _detached(exc)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            logger.exception("connection to %s failed", self.peer.node_id)
            self._error = self._error or TransportError(f"connection failed: {exc}")
        finally:
            self._finish()
            if not self._graceful:
                await self._wire.close()  # already aborted; this releases the socket

    async def _on_response(self, frame: FrameHead, header: dict[str, Any]) -> None:
        pend = self._pending.get(frame.request_id)
        size = frame.payload_len
        if pend is None or pend.future.done():
            if size:  # a late or duplicate response: its requester has gone
                await self._wire.discard_payload(frame)
            return
        payload: memoryview | None = None
        if size:
            try:
                chosen = None
                if pend.recv_into is not None and frame.kind is not MsgKind.ERROR:
                    chosen = pend.recv_into(frame.kind, header, size)
                payload = _dest_view(chosen, size, "recv_into")
            except Exception as exc:
                pend.future.set_exception(exc)
                await self._wire.discard_payload(frame)
                return
            pend.receiving = True
            if not self._wire.inline_payload:
                self._spawn(self._finish_response(pend, frame, header, payload))
                return
            await self._wire.recv_payload(frame, payload)
            pend.receiving = False
            self._stats.bytes_received += size
        pend.future.set_result(Message(frame.kind, header, payload, frame.request_id))

    async def _finish_response(
        self, pend: _Pending, frame: FrameHead, header: dict[str, Any], dest: memoryview
    ) -> None:
        try:
            await self._wire.recv_payload(frame, dest)
        except TransportError as exc:
            self._abort(exc)
            return
        finally:
            pend.receiving = False
        self._stats.bytes_received += frame.payload_len
        if not pend.future.done():
            pend.future.set_result(Message(frame.kind, header, dest, frame.request_id))

    async def _on_message(self, frame: FrameHead, header: dict[str, Any]) -> None:
        oneway = bool(frame.flags & Flags.ONEWAY)
        size = frame.payload_len
        if frame.kind is MsgKind.ERROR:
            logger.warning("peer %s reported: %s", self.peer.node_id, header.get("message"))
            if size:
                await self._wire.discard_payload(frame)
            return
        await self._handler_slots.acquire()
        try:
            payload: memoryview | None = None
            if size:
                try:
                    chosen = None
                    if self._alloc is not None:
                        chosen = self._alloc(self.peer, frame.kind, header, size)
                    payload = _dest_view(chosen, size, "alloc")
                except Exception as exc:
                    # No room (e.g. NoSpace) or a bad buffer: skip the bytes, keep serving.
                    await self._wire.discard_payload(frame)
                    self._stats.handler_errors += 1
                    if not oneway:
                        self._spawn(self._reply_error(frame.request_id, exc, release=True))
                    else:
                        self._handler_slots.release()
                    return
                if self._wire.inline_payload:
                    await self._wire.recv_payload(frame, payload)
                    self._stats.bytes_received += size
            msg = Message(frame.kind, header, payload, frame.request_id)
        except BaseException:
            self._handler_slots.release()
            raise
        self._spawn(self._serve(frame, msg))

    async def _serve(self, frame: FrameHead, msg: Message) -> None:
        try:
            if msg.payload is not None and not self._wire.inline_payload:
                assert isinstance(msg.payload, memoryview)
                try:
                    await self._wire.recv_payload(frame, msg.payload)
                except TransportError as exc:
                    self._abort(exc)
                    return
                self._stats.bytes_received += frame.payload_len
            oneway = bool(frame.flags & Flags.ONEWAY)
            if self._handler is None:
                missing = ProtocolError(f"no handler for {msg.kind.name} on this connection")
                if not oneway:
                    await self._reply_error(frame.request_id, missing, release=False)
                return
            try:
                reply = await self._handler(self.peer, msg)
            except Exception as exc:
                self._stats.handler_errors += 1
                if not isinstance(exc, MeshKVError):
                    logger.exception("handler failed on %s from %s", msg.kind.name, self.peer)
                if not oneway:
                    await self._reply_error(frame.request_id, exc, release=False)
                return
            if oneway:
                if reply is not None and reply.on_sent is not None:
                    reply.on_sent()
                return
            await self._reply(frame.request_id, reply or Message(MsgKind.ACK))
        finally:
            self._handler_slots.release()

    async def _reply(self, request_id: int, reply: Message) -> None:
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                await self._send(
                    reply.kind, Flags.RESPONSE, request_id, reply.header, reply.payload
                )
        except (TransportError, ProtocolError, TimeoutError) as exc:
            logger.info("reply to %s not sent: %s", self.peer.node_id, exc)
            if isinstance(exc, TimeoutError):
                self._abort(ConnectionClosed("peer stopped reading replies"))
        finally:
            if reply.on_sent is not None:
                reply.on_sent()

    async def _reply_error(self, request_id: int, exc: BaseException, *, release: bool) -> None:
        code = exc.code if isinstance(exc, MeshKVError) else "internal"
        try:
            await self._reply(
                request_id, Message(MsgKind.ERROR, {"code": code, "message": str(exc)})
            )
        finally:
            if release:
                self._handler_slots.release()


MAX_PENDING_HANDSHAKES = 64
"""Accepted links still authenticating; more are closed at once (a flood cannot queue)."""


async def client_session(
    wire: Wire,
    transport_name: str,
    config: TransportConfig,
    stats: TransportStats,
    deadline: float,
    *,
    handler: Handler | None = None,
    on_close: Callable[[Session], None] | None = None,
) -> Session:
    """Authenticate an outgoing link and wrap it in a ``Session`` (the wire is closed on
    failure)."""
    try:
        async with asyncio.timeout_at(deadline):
            result = await client_handshake(wire, config)
    except TimeoutError as exc:
        stats.auth_failures += 1
        await wire.close()
        if isinstance(exc, DeadlineExceeded):
            raise
        raise DeadlineExceeded(f"handshake with {wire.remote} passed its deadline") from None
    except (MeshKVError, OSError) as exc:
        stats.auth_failures += 1
        if isinstance(exc, NodeIdConflict):
            stats.record_conflict(str(exc), outgoing=True)
        await wire.close()
        if isinstance(exc, MeshKVError):
            raise
        raise TransportError(f"handshake with {wire.remote} failed: {exc}") from exc
    except BaseException:
        await wire.close()
        raise
    stats.connections_opened += 1
    peer = PeerInfo(result.peer_node_id, wire.remote, result.protocol_version, transport_name)
    return Session(wire, peer, config, stats, handler=handler, on_close=on_close)


def _detached(exc: TransportError) -> TransportError:
    """A copy of ``exc`` without its traceback, to keep or to hand out. A session never
    holds an exception that was raised: its traceback's frames hold the session, and the
    cycle (with the wire's buffers) would wait for a full garbage collection, which a
    long-lived agent seldom runs. Each waiter gets its own copy for the same reason."""
    try:
        copy = type(exc)(*exc.args)
    except TypeError:
        copy = ConnectionClosed(str(exc))
    copy.__cause__ = None
    return copy


class SessionSet:
    """The sessions one transport or listener owns; a session leaves the set when it closes,
    and ``close_all`` closes whatever is left (at shutdown)."""

    __slots__ = ("_sessions",)

    def __init__(self) -> None:
        self._sessions: set[Session] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: Session) -> Session:
        self._sessions.add(session)
        return session

    def discard(self, session: Session) -> None:
        self._sessions.discard(session)

    async def open_client(
        self,
        wire: Wire,
        transport_name: str,
        config: TransportConfig,
        stats: TransportStats,
        deadline: float,
        handler: Handler | None,
    ) -> Session:
        """Authenticate an outgoing link (``client_session``) and keep the session."""
        session = await client_session(
            wire, transport_name, config, stats, deadline, handler=handler, on_close=self.discard
        )
        return self.add(session)

    async def close_all(self) -> None:
        sessions = list(self._sessions)
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


class SessionListener(Listener):
    """Authenticates accepted links and owns the sessions they become."""

    def __init__(
        self,
        address: str,
        transport_name: str,
        config: TransportConfig,
        stats: TransportStats,
        handler: Handler,
        alloc: Alloc | None,
    ) -> None:
        self.address = address
        self._name = transport_name
        self._config = config
        self._stats = stats
        self._handler = handler
        self._alloc = alloc
        self._sessions = SessionSet()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def sessions(self) -> int:
        """Authenticated connections currently open."""
        return len(self._sessions)

    def accept(self, wire: Wire) -> None:
        """Start authenticating a freshly accepted link."""
        if self._closing or len(self._handshakes) >= MAX_PENDING_HANDSHAKES:
            logger.warning("refusing %s: listener closing or too many handshakes", wire.remote)
            wire.abort()
            task = asyncio.get_running_loop().create_task(wire.close())
        else:
            task = asyncio.get_running_loop().create_task(self._authenticate(wire))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _authenticate(self, wire: Wire) -> None:
        try:
            async with asyncio.timeout(self._config.handshake_timeout):
                result = await server_handshake(wire, self._config)
        except Exception as exc:  # whatever went wrong, this peer is not let in
            self._stats.auth_failures += 1
            if isinstance(exc, NodeIdConflict):
                self._stats.record_conflict(str(exc), outgoing=False)
            if not isinstance(exc, MeshKVError | TimeoutError | OSError):
                logger.exception("handshake with %s failed unexpectedly", wire.remote)
            logger.warning("rejected peer %s: %s", wire.remote, str(exc) or type(exc).__name__)
            await wire.close()
            return
        except BaseException:
            await wire.close()
            raise
        if self._closing:
            await wire.close()
            return
        self._stats.connections_accepted += 1
        peer = PeerInfo(result.peer_node_id, wire.remote, result.protocol_version, self._name)
        session = Session(
            wire,
            peer,
            self._config,
            self._stats,
            handler=self._handler,
            alloc=self._alloc,
            on_close=self._sessions.discard,
        )
        self._sessions.add(session)

    async def _stop_accepting(self) -> None:
        """Subclasses stop their accept loop here."""

    async def close(self) -> None:
        self._closing = True
        await self._stop_accepting()
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)
        await self._sessions.close_all()
