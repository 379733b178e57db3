"""Byte-stream wires: frames over a TCP socket, with payloads landing in place.

Payload bytes never pass through asyncio streams (FACTS.md: 0.76 GB/s against ~6.5 GB/s
for raw sockets). Two receive paths exist; both read frame heads through a small staging
buffer and receive each payload straight into its destination buffer:

* ``SocketWire`` — ``loop.sock_recv_into`` / ``loop.sock_sendall`` on the non-blocking
  socket (the default: fastest here under uvloop and stock asyncio alike, see
  ``meshkv/bench/transport_baselines.py``). A frame with a large payload leaves with one
  ``sendmsg`` of its head and payload (the rest, if the socket took only part, by
  ``sock_sendall``): one system call and one segment fewer per chunk
  (``benchmarks.transport_frames``: 0.77 -> 0.82x the raw socket for 12 x 2 MiB).
* ``ProtocolWire`` — an ``asyncio.BufferedProtocol`` whose ``get_buffer`` hands out the
  destination buffer; used for TLS, where the event loop owns the socket.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import socket
from typing import cast

from meshkv.errors import ConnectionClosed, ProtocolError, TransportError

from .framing import HEAD_BYTES, FrameHead, decode_head
from .wire import Payload, Wire

STAGE_BYTES = 256 * 1024
"""Staging buffer for frame heads and headers (a header is at most 64 KiB)."""
COALESCE_BYTES = 64 * 1024
"""Payloads up to this size are copied next to their head and sent in one write."""
_SPILL_BYTES = 1 << 20
"""ProtocolWire: bytes buffered while no read is waiting, before reading pauses."""


class StreamWire(Wire):
    """Frame reading and writing over any ordered byte stream."""

    inline_payload = True

    def __init__(self, remote: str, max_header_bytes: int, max_payload_bytes: int) -> None:
        self.remote = remote
        self._max_header = max_header_bytes
        self._max_payload = max_payload_bytes
        self._stage = bytearray(STAGE_BYTES)
        self._view = memoryview(self._stage)
        self._start = 0
        self._end = 0
        self._send_lock = asyncio.Lock()
        self._aborted = False

    @abc.abstractmethod
    async def _recv_some(self, view: memoryview) -> int:
        """Receive at least one byte into ``view``; 0 at end of stream."""

    @abc.abstractmethod
    async def _send_all(self, data: bytes | memoryview) -> None:
        """Write all of ``data``; return once it is no longer referenced."""

    async def _send_two(self, first: bytes, payload: memoryview) -> None:
        """Write ``first`` then ``payload``."""
        await self._send_all(first)
        await self._send_all(payload)

    async def _fill(self, count: int, what: str) -> None:
        while self._end - self._start < count:
            if self._start and STAGE_BYTES - self._start < count:
                held = self._end - self._start
                self._view[:held] = self._view[self._start : self._end]
                self._start, self._end = 0, held
            got = await self._recv_some(self._view[self._end :])
            if got == 0:
                held = self._end - self._start
                if held == 0 and what == "frame head":
                    raise ConnectionClosed(f"{self.remote} closed the connection")
                raise ProtocolError(
                    f"truncated frame from {self.remote}: stream ended {held} bytes into a "
                    f"{count}-byte {what}"
                )
            self._end += got

    def _take(self, count: int) -> memoryview:
        view = self._view[self._start : self._start + count]
        self._start += count
        return view

    async def recv_head(self) -> tuple[FrameHead, bytes]:
        await self._fill(HEAD_BYTES, "frame head")
        frame = decode_head(
            self._take(HEAD_BYTES),
            max_header_bytes=self._max_header,
            max_payload_bytes=self._max_payload,
        )
        raw = b""
        if frame.header_len:
            await self._fill(frame.header_len, "frame header")
            raw = bytes(self._take(frame.header_len))
        if self._start == self._end:
            self._start = self._end = 0
        return frame, raw

    async def recv_payload(self, frame: FrameHead, dest: memoryview) -> None:
        size = frame.payload_len
        have = min(self._end - self._start, size)
        dest[:have] = self._take(have)
        if self._start == self._end:
            self._start = self._end = 0
        pos = have
        while pos < size:
            got = await self._recv_some(dest[pos:size])
            if got == 0:
                raise ConnectionClosed(
                    f"{self.remote} closed the connection {pos} bytes into a {size}-byte payload"
                )
            pos += got

    async def discard_payload(self, frame: FrameHead) -> None:
        left = frame.payload_len
        have = min(self._end - self._start, left)
        self._take(have)
        left -= have
        if left:
            # The stage is empty now (the payload outlasted it): use it as scratch.
            self._start = self._end = 0
        while left:
            got = await self._recv_some(self._view[: min(left, STAGE_BYTES)])
            if got == 0:
                raise ConnectionClosed(f"{self.remote} closed the connection mid-payload")
            left -= got

    async def send_frame(self, head: bytes, header: bytes, payload: Payload | None) -> None:
        async with self._send_lock:
            if self._aborted:
                raise ConnectionClosed(f"connection to {self.remote} is closed")
            try:
                if payload is None:
                    await self._send_all(head + header)
                elif payload.nbytes <= COALESCE_BYTES:
                    await self._send_all(b"".join((head, header, payload)))
                else:
                    await self._send_two(head + header, payload)
            except BaseException:
                # Part of a frame may have left; the stream cannot be resumed.
                self.abort()
                raise


class SocketWire(StreamWire):
    """``sock_recv_into`` / ``sock_sendall`` on a non-blocking socket."""

    def __init__(
        self, sock: socket.socket, remote: str, max_header_bytes: int, max_payload_bytes: int
    ) -> None:
        super().__init__(remote, max_header_bytes, max_payload_bytes)
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()

    async def _recv_some(self, view: memoryview) -> int:
        if self._aborted:
            raise ConnectionClosed(f"connection to {self.remote} is closed")
        try:
            return await self._loop.sock_recv_into(self._sock, view)
        except OSError as exc:
            raise ConnectionClosed(f"receive from {self.remote} failed: {exc}") from exc

    async def _send_all(self, data: bytes | memoryview) -> None:
        try:
            await self._loop.sock_sendall(self._sock, data)
        except OSError as exc:
            raise ConnectionClosed(f"send to {self.remote} failed: {exc}") from exc

    async def _send_two(self, first: bytes, payload: memoryview) -> None:
        # One sendmsg for the head and as much of the payload as the socket takes: the
        # head does not leave as a segment of its own, and one system call is saved.
        try:
            sent = self._sock.sendmsg([first, payload])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise ConnectionClosed(f"send to {self.remote} failed: {exc}") from exc
        if sent < len(first):
            await self._send_all(memoryview(first)[sent:])
            sent = len(first)
        if sent - len(first) < payload.nbytes:
            await self._send_all(payload[sent - len(first) :])

    def abort(self) -> None:
        if not self._aborted:
            self._aborted = True
            # Wakes any pending send or receive; the fd is closed later in close().
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    async def close(self) -> None:
        self.abort()
        try:
            await asyncio.sleep(0)  # let woken I/O callbacks unregister before the fd goes
        finally:
            self._sock.close()


class _Receiver(asyncio.BufferedProtocol):
    """Receives into the buffer a waiting read gave it, else into a bounded spill."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._target: memoryview | None = None
        self._spill = bytearray(_SPILL_BYTES)
        self._spill_len = 0
        self._waiter: asyncio.Future[int] | None = None
        self._paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self.lost: BaseException | None = None
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # Pause as soon as anything is buffered: a send returns only once it has left.
        self.transport.set_write_buffer_limits(high=0, low=0)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target
        return memoryview(self._spill)[self._spill_len :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is not None:
            self._target = None
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(nbytes)
            return
        self._spill_len += nbytes
        if self._spill_len >= _SPILL_BYTES - STAGE_BYTES and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(0)  # data is in the spill now

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionClosed("connection lost")
        self._eof = True
        self._target = None
        self._wake()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(0)

    async def recv_some(self, view: memoryview) -> int:
        while True:
            if self._spill_len:
                count = min(self._spill_len, len(view))
                view[:count] = memoryview(self._spill)[:count]
                rest = self._spill_len - count
                self._spill[:rest] = self._spill[count : self._spill_len]
                self._spill_len = rest
                if self._paused and rest < _SPILL_BYTES // 2 and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return count
            if self._eof or self.transport is None:
                return 0
            self._target = view
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                got = await self._waiter
            finally:
                self._target = None
                self._waiter = None
            if got:
                return got

    async def send_all(self, data: bytes | memoryview) -> None:
        if self.transport is None or self.lost is not None:
            raise ConnectionClosed("connection lost")
        self.transport.write(data)
        while self.transport.get_write_buffer_size() > 0:
            if self.lost is not None:
                raise ConnectionClosed(f"connection lost: {self.lost}")
            self._writable.clear()
            await self._writable.wait()
        if self.lost is not None:
            raise ConnectionClosed(f"connection lost: {self.lost}")


class ProtocolWire(StreamWire):
    """A ``BufferedProtocol`` transport (plain or TLS) that receives into the destination."""

    def __init__(
        self,
        transport: asyncio.Transport,
        receiver: _Receiver,
        remote: str,
        max_header_bytes: int,
        max_payload_bytes: int,
    ) -> None:
        super().__init__(remote, max_header_bytes, max_payload_bytes)
        self._transport = transport
        self._receiver = receiver

    @staticmethod
    def protocol() -> _Receiver:
        return _Receiver()

    async def _recv_some(self, view: memoryview) -> int:
        if self._aborted:
            raise ConnectionClosed(f"connection to {self.remote} is closed")
        return await self._receiver.recv_some(view)

    async def _send_all(self, data: bytes | memoryview) -> None:
        try:
            await self._receiver.send_all(data)
        except OSError as exc:
            raise TransportError(f"send to {self.remote} failed: {exc}") from exc

    def abort(self) -> None:
        if not self._aborted:
            self._aborted = True
            self._receiver.connection_lost(None)
            self._transport.abort()

    async def close(self) -> None:
        self.abort()
        await asyncio.sleep(0)
