"""What a transport must provide below the session: moving whole frames.

A ``Wire`` is one raw, unauthenticated link (a TCP socket, a UCX endpoint, an in-memory
queue pair). The handshake and the multiplexed ``Session`` are written once on top of it.
"""

from __future__ import annotations

import abc

from .framing import FrameHead

Payload = memoryview
"""A payload to send, as a flat byte view (``memoryview.cast("B")``)."""


class Wire(abc.ABC):
    """Frame I/O for one link. Not safe against concurrent ``recv_*`` calls: one reader."""

    inline_payload: bool = True
    """True when a frame's payload follows its head in one ordered stream, so the reader
    must consume it before the next head (TCP). False when payloads travel separately and
    may be received concurrently (UCX tags)."""

    remote: str = ""
    """The peer's address as seen on this link."""

    @abc.abstractmethod
    async def send_frame(self, head: bytes, header: bytes, payload: Payload | None) -> None:
        """Send one whole frame. Safe to call from many tasks: frames never interleave.

        If it is cancelled after part of a frame has left, the link is aborted (a stream
        cannot resume mid-frame). Returns once ``payload`` is no longer needed.
        """

    @abc.abstractmethod
    async def recv_head(self) -> tuple[FrameHead, bytes]:
        """Receive the next frame's validated head and its raw msgpack header bytes."""

    @abc.abstractmethod
    async def recv_payload(self, frame: FrameHead, dest: memoryview) -> None:
        """Receive ``frame``'s payload into ``dest`` (exactly ``frame.payload_len`` bytes)."""

    @abc.abstractmethod
    async def discard_payload(self, frame: FrameHead) -> None:
        """Consume ``frame``'s payload without keeping it."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Stop at once: no later write into any receive buffer, pending I/O fails."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Abort and release the underlying resources."""
