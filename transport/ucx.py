"""UCX transport over ``ucxx`` (optional extra ``meshkv[ucx]``).

Frames are split in two on a UCX endpoint:

* the head and msgpack header travel as one active message (``am_send``), so the receiver
  learns their exact size and one pump task reads them in order;
* a payload travels as a tag message whose tag is derived from (request id, direction), so
  the receiver posts it straight into the buffer chosen from the header, and payloads of
  different requests move concurrently instead of queueing behind each other.

Closing follows FACTS.md: the closing side sends a BYE message and waits (briefly) for the
peer's BYE-ACK before closing the endpoint, so a receive still in flight is not reset.
UCX is configured once per process on the first ``UcxTransport`` (see ``UcxOptions``):
1 MiB TCP segments and a non-threaded progress mode make loopback several times faster on
small machines. Listener endpoints need endpoint error handling, which turns UCX's
shared-memory transports off unless ``POSIX_ERROR_HANDLING``/``SYSV_ERROR_HANDLING`` are
set; the defaults leave them off. Two nodes never share memory, so agents on one host then
move bytes as two nodes would (UCX's TCP); and shared memory moves large messages by
fragments that each need both agents' progress, so where the agents share a core a P/D
transfer took 2.4x as long with it (docs/benchmarks.md, 2026-12-07). Co-located agents
may set ``UCX_POSIX_ERROR_HANDLING=y UCX_SYSV_ERROR_HANDLING=y`` to have it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from meshkv.errors import (
    ConfigError,
    ConnectionClosed,
    DeadlineExceeded,
    ProtocolError,
    TransportError,
)

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
from .framing import HEAD_BYTES, Flags, FrameHead, decode_head
from .session import SessionListener, SessionSet
from .wire import Payload, Wire

logger = logging.getLogger(__name__)

_BYE = b"MKVB"
_BYE_ACK = b"MKVA"
BYE_TIMEOUT = 1.0
"""Seconds a closing side waits for the peer's BYE-ACK."""
CONTROL_QUEUE = 256
"""Control messages buffered per endpoint before the pump stops reading (backpressure)."""

DEFAULT_UCX_OPTIONS = {
    "TCP_TX_SEG_SIZE": "1M",
    "TCP_RX_SEG_SIZE": "1M",
}


@dataclass(slots=True)
class UcxOptions:
    """UCX settings; applied when this process first initialises UCX."""

    progress_mode: Literal["blocking", "polling", "thread", "thread-polling"] = "blocking"
    """ucxx progress mode: "blocking" sleeps on the worker's fd (no busy loop); "polling"
    is marginally faster but spins a core."""
    ucx_options: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_UCX_OPTIONS))
    """UCX configuration (names without the ``UCX_`` prefix); environment variables of the
    same names take precedence."""
    connect_timeout: float = 5.0
    """Seconds ucxx may spend exchanging endpoint information."""

    def __post_init__(self) -> None:
        if self.progress_mode not in ("blocking", "polling", "thread", "thread-polling"):
            raise ConfigError(f"ucx: unknown progress mode {self.progress_mode!r}")
        if self.connect_timeout <= 0:
            raise ConfigError("ucx: connect_timeout must be positive")


def _import_ucxx() -> Any:
    try:
        import ucxx
    except ImportError as exc:
        raise ConfigError(
            "the UCX transport needs ucxx: pip install 'meshkv[ucx]' (ucxx-cu12)"
        ) from exc
    return ucxx


def _init_ucx(ucxx: Any, options: UcxOptions) -> None:
    try:
        ucxx.init(
            options=options.ucx_options,
            env_takes_precedence=True,
            progress_mode=options.progress_mode,
        )
    except RuntimeError:  # already initialised in this process: keep its settings
        logger.debug("UCX already initialised; keeping its options")


BACKSTOP_S = 0.05
"""The progress driver also progresses the worker this often, whatever its descriptor says
(UCX work that raises no event, e.g. a retry of a queued operation)."""


class BlockingProgress:
    """Drives a ucxx worker from the event loop: sleep on the worker's epoll descriptor,
    progress when it fires, re-arm it, sleep again; and lets a receiver wait for the next
    progress instead of polling.

    It replaces two busy loops of ucxx 0.52 outside its thread modes, each of which kept an
    idle agent at 100 % of a core (measured; bare ucxx beside two idle agents moved 1-3 GB/s
    instead of 9-13):

    * its ``BlockingMode`` re-arms the worker only once: after the first event the
      descriptor stays readable and the loop calls the reader on every turn;
    * an awaited request polls for completion with ``asyncio.sleep(0)``, so a connection's
      standing receive for the next control message spins the loop until one arrives.
      ``next_event`` lets that receive wait for progress events instead.

    The order of calls is UCX's (``ucp_worker_arm``): progress, then arm; a busy answer
    means events are pending, so progress again before arming."""

    def __init__(
        self, worker: Any, loop: asyncio.AbstractEventLoop, *, keep: object = None
    ) -> None:
        self._worker = worker
        self._loop = loop
        self._keep = keep
        """ucxx's own progress object this one replaced: kept alive, because collecting it
        would remove the reader of the same descriptor (its finalizer does)."""
        worker.init_blocking_progress_mode()  # idempotent: returns the existing descriptor
        self._fd: int = worker.epoll_file_descriptor
        self._waiters: list[asyncio.Future[None]] = []
        self._arming: asyncio.Task[None] | None = None
        self.wakeups = 0
        """Times the descriptor fired (tests read it to see an idle worker sleep)."""
        loop.add_reader(self._fd, self._on_event)
        self._arm_soon()
        self._backstop = loop.create_task(self._progress_backstop())

    async def next_event(self) -> None:
        """Return after the worker's next progress (an event, or the backstop's tick)."""
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter

    def _progress(self) -> None:
        self._worker.progress()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _on_event(self) -> None:
        self.wakeups += 1
        self._progress()
        self._arm_soon()

    def _arm_soon(self) -> None:
        if self._arming is None or self._arming.done():
            self._arming = self._loop.create_task(self._arm())

    async def _arm(self) -> None:
        while True:
            self._progress()
            # Let the callbacks that progress made ready run first: they may post sends
            # and receives, which must reach UCX before the worker sleeps.
            await asyncio.sleep(0)
            self._progress()
            if self._worker.arm():
                return

    async def _progress_backstop(self) -> None:
        while True:
            await asyncio.sleep(BACKSTOP_S)
            self._progress()


def _drive_progress(ucxx: Any) -> BlockingProgress | None:
    """The progress driver of the running loop in "blocking" mode, installed on first use
    in place of ucxx's own (see ``BlockingProgress``); None in ucxx's other modes."""
    loop = asyncio.get_running_loop()
    try:
        from ucxx._lib_async import application_context as app
        from ucxx._lib_async.continuous_ucx_progress import BlockingMode

        ctx = ucxx.core._get_ctx()
        mode, tasks = ctx.progress_mode, app.ProgressTasks
    except (ImportError, AttributeError) as exc:  # another ucxx layout: keep its progress
        logger.warning("UCX progress left to ucxx (it may busy-poll): %r", exc)
        return None
    if mode != "blocking" or not isinstance(tasks, dict):
        return None
    current = tasks.get(loop)
    if isinstance(current, BlockingProgress):
        return current
    if isinstance(current, BlockingMode):  # ucxx started it when it initialised
        loop.remove_reader(ctx.worker.epoll_file_descriptor)
        for task in getattr(current, "_tasks", ()):
            if task is not None:
                task.cancel()
    elif current is not None:
        return None
    driver = BlockingProgress(ctx.worker, loop, keep=current)
    tasks[loop] = driver
    return driver


@dataclass(frozen=True, slots=True)
class _Posting:
    """What posting requests on ucxx's endpoint handle needs (ucxx 0.52's layout): the
    wrapper's own calls wait for completion by polling, which spins the core a peer on the
    same core needs (docs/benchmarks.md, 2026-12-07)."""

    array: Any
    tag: Any
    mask: Any
    hash64: Any


@functools.cache
def _posting() -> _Posting | None:
    try:
        from ucxx._lib.arr import Array
        from ucxx._lib_async.utils import hash64bits
        from ucxx.types import Tag, TagMaskFull
    except ImportError as exc:  # another ucxx layout: keep its waiting
        logger.warning("UCX requests waited for by ucxx (it polls): %r", exc)
        return None
    return _Posting(Array, Tag, TagMaskFull, hash64bits)


class UcxWire(Wire):
    """One ucxx endpoint."""

    inline_payload = False

    def __init__(
        self,
        ep: Any,
        remote: str,
        max_header_bytes: int,
        max_payload_bytes: int,
        progress: BlockingProgress | None = None,
    ) -> None:
        self.remote = remote
        self._ep = ep
        self._progress = progress
        self._max_header = max_header_bytes
        self._max_payload = max_payload_bytes
        self._posting = _posting() if progress is not None else None
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(CONTROL_QUEUE)
        self._ended: BaseException | None = None
        self._acked = asyncio.Event()
        self._aborted = False
        self._closed = False
        self._pump = asyncio.get_running_loop().create_task(self._pump_control())

    @staticmethod
    def _tag(frame: FrameHead) -> int:
        return (frame.request_id << 1) | (1 if frame.flags & Flags.RESPONSE else 0)

    async def _pump_control(self) -> None:
        try:
            while True:
                data = await self._recv_control()
                if data == _BYE:
                    with contextlib.suppress(Exception):
                        await self._ep.am_send(_BYE_ACK)
                    self._ended = ConnectionClosed(f"{self.remote} closed the connection")
                    break
                if data == _BYE_ACK:
                    self._acked.set()
                    self._ended = ConnectionClosed("connection closed")
                    break
                await self._queue.put(data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any ucxx failure ends the link
            self._ended = ConnectionClosed(f"UCX link to {self.remote} failed: {exc}")
        await self._queue.put(None)

    async def _recv_control(self) -> bytes:
        """The next control message. With our progress driver the receive is waited for
        by progress events, not by ucxx's completion polling (see ``BlockingProgress``)."""
        if self._progress is None:
            return bytes(memoryview(await self._ep.am_recv()).cast("B"))
        handle = self._ep._ep  # ucxx's endpoint handle (the wrapper would poll)
        request = handle.am_recv()
        while not request.completed:
            handle.raise_on_error()
            await self._progress.next_event()
        request.check_error()
        return bytes(memoryview(request.recv_buffer).cast("B"))

    async def recv_head(self) -> tuple[FrameHead, bytes]:
        if self._aborted:
            raise ConnectionClosed(f"connection to {self.remote} is closed")
        data = await self._queue.get()
        if data is None:
            self._queue.put_nowait(None)  # later calls see the end too
            raise self._ended or ConnectionClosed("connection closed")
        frame = decode_head(
            data[:HEAD_BYTES],
            max_header_bytes=self._max_header,
            max_payload_bytes=self._max_payload,
        )
        if len(data) != HEAD_BYTES + frame.header_len:
            raise ProtocolError(
                f"control message of {len(data)} bytes does not match its head "
                f"({HEAD_BYTES} + {frame.header_len})"
            )
        return frame, data[HEAD_BYTES:]

    async def _wait(self, request: Any, buffer: Any) -> None:
        """Wait for a request posted on the endpoint handle by progress events. ``buffer``
        (the request's) stays referenced by this frame until it ends: the request does not
        keep it, and a send of a freed temporary sent whatever reused its memory (found at
        once: a peer read a control message with a payload's bytes)."""
        progress = self._progress
        assert progress is not None
        handle = self._ep._ep
        while not request.completed:
            handle.raise_on_error()
            await progress.next_event()
        request.check_error()

    def _user_tag(self, frame: FrameHead, direction: str) -> Any:
        """The tag ucxx's wrapper would use for ``self._tag(frame)``: hashed with the tag
        the two ends agreed at connection (UCX matches tags per worker, not endpoint)."""
        posting = self._posting
        assert posting is not None
        return posting.tag(posting.hash64(self._ep._tags[direction], hash(self._tag(frame))))

    async def recv_payload(self, frame: FrameHead, dest: memoryview) -> None:
        if self._aborted:
            raise ConnectionClosed(f"connection to {self.remote} is closed")
        posting = self._posting
        try:
            if posting is None or self._ep.closed:
                # (the wrapper's receive also finds a payload that arrived before an error)
                await self._ep.recv(dest, tag=self._tag(frame))
                return
            handle = self._ep._ep
            handle.raise_on_error()
            buffer = posting.array(dest)
            request = handle.tag_recv(buffer, self._user_tag(frame, "msg_recv"), posting.mask)
            await self._wait(request, buffer)
        except (asyncio.CancelledError, TransportError):
            raise
        except Exception as exc:
            raise ConnectionClosed(f"UCX receive from {self.remote} failed: {exc}") from exc

    async def discard_payload(self, frame: FrameHead) -> None:
        await self.recv_payload(frame, memoryview(bytearray(frame.payload_len)))

    async def send_frame(self, head: bytes, header: bytes, payload: Payload | None) -> None:
        if self._aborted or self._closed:
            raise ConnectionClosed(f"connection to {self.remote} is closed")
        posting = self._posting
        try:
            if posting is None:
                await self._ep.am_send(head + header)
            else:
                control = posting.array(head + header)
                await self._wait(self._ep._ep.am_send(control), control)
            if payload is not None:
                frame = decode_head(head)
                try:
                    if posting is None:
                        await self._ep.send(payload, tag=self._tag(frame))
                    else:
                        tag = self._user_tag(frame, "msg_send")
                        buffer = posting.array(payload)
                        await self._wait(self._ep._ep.tag_send(buffer, tag), buffer)
                except BaseException:
                    self.abort()  # the posted send may still read the caller's buffer
                    raise
        except (asyncio.CancelledError, TransportError):
            raise
        except Exception as exc:
            raise ConnectionClosed(f"UCX send to {self.remote} failed: {exc}") from exc

    def abort(self) -> None:
        if not self._aborted:
            self._aborted = True
            self._pump.cancel()
            with contextlib.suppress(Exception):
                self._ep.abort()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._aborted and self._ended is None:
            try:
                await self._ep.am_send(_BYE)
                async with asyncio.timeout(BYE_TIMEOUT):
                    await self._acked.wait()
            except Exception as exc:  # the peer went away first; close anyway
                logger.debug("no BYE-ACK from %s: %s", self.remote, exc)
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)
        if not self._aborted:
            self._aborted = True
            with contextlib.suppress(Exception):
                await self._ep.close()


class _UcxListener(SessionListener):
    def __init__(
        self,
        transport: UcxTransport,
        host: str,
        port: int,
        handler: Handler,
        alloc: Alloc | None,
    ) -> None:
        self._progress = _drive_progress(transport.ucxx)
        self._ucx = transport.ucxx.create_listener(
            self._on_endpoint, port=port, connect_timeout=transport.options.connect_timeout
        )
        super().__init__(
            format_address(host, self._ucx.port),
            "ucx",
            transport.config,
            transport.stats,
            handler,
            alloc,
        )
        self._count = 0

    async def _on_endpoint(self, ep: Any) -> None:
        self._count += 1
        remote = f"{self.address}#in{self._count}"
        self.accept(
            UcxWire(
                ep,
                remote,
                self._config.max_header_bytes,
                self._config.max_payload_bytes,
                self._progress,
            )
        )

    async def _stop_accepting(self) -> None:
        self._ucx.close()


class UcxTransport(Transport):
    """Peer transport over UCX (UCX's tcp on this machine, its shared memory being off by
    default; RDMA when the system UCX has verbs). Endpoints keep UCX's peer-failure
    handling, which rules out ``cma`` for large messages (its memory domain cannot revoke a
    dead peer's access; docs/benchmarks.md, "Runs of 2026-12-05", item 16)."""

    name = "ucx"

    def __init__(self, config: TransportConfig, options: UcxOptions | None = None) -> None:
        self.config = config
        self.options = options or UcxOptions()
        self.stats = TransportStats()
        self.ucxx = _import_ucxx()
        _init_ucx(self.ucxx, self.options)
        self._sessions = SessionSet()

    async def listen(
        self, host: str, port: int, handler: Handler, *, alloc: Alloc | None = None
    ) -> Listener:
        try:
            return _UcxListener(self, host, port, handler, alloc)
        except Exception as exc:
            raise TransportError(f"cannot listen on UCX port {port}: {exc}") from exc

    async def connect(
        self, address: str, deadline: float, *, handler: Handler | None = None
    ) -> Connection:
        host, port = parse_address(address)
        try:
            progress = _drive_progress(self.ucxx)
            async with asyncio.timeout_at(deadline):
                ep = await self.ucxx.create_endpoint(
                    host, port, connect_timeout=self.options.connect_timeout
                )
        except TimeoutError:
            raise DeadlineExceeded(f"connecting to {address} passed its deadline") from None
        except Exception as exc:
            raise TransportError(f"cannot connect to {address} over UCX: {exc}") from exc
        wire = UcxWire(
            ep, address, self.config.max_header_bytes, self.config.max_payload_bytes, progress
        )
        return await self._sessions.open_client(
            wire, self.name, self.config, self.stats, deadline, handler
        )

    async def close(self) -> None:
        await self._sessions.close_all()
