"""``SocketWire`` sends a large frame's head with its payload in one ``sendmsg``: whatever
part of the two the socket takes, the rest follows and the frame arrives whole (under stock
asyncio and uvloop)."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest
import uvloop

from meshkv.transport import MsgKind
from meshkv.transport.framing import Flags, encode_head, pack_header
from meshkv.transport.stream import SocketWire

LOOPS = ["asyncio", "uvloop"]


class _Stingy(socket.socket):
    """A socket whose ``sendmsg`` takes at most ``limit`` bytes (None: refuses with
    ``BlockingIOError``), so every partial-send path of ``SocketWire`` runs for sure."""

    limit: int | None = 0
    calls = 0

    def sendmsg(self, buffers: Any, *args: Any) -> int:  # type: ignore[override]
        type(self).calls += 1
        if self.limit is None:
            raise BlockingIOError
        data = b"".join(bytes(b) for b in buffers)[: self.limit]
        return super().sendmsg([data], *args)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("taken", ["none", "inside_head", "head_exactly", "inside_payload", "all"])
def test_large_frame_arrives_whole_however_much_sendmsg_takes(loop: str, taken: str) -> None:
    """A large payload leaves with its head in one ``sendmsg``; whatever part of the two
    the socket takes, ``sock_sendall`` sends the rest and the frame arrives whole."""
    header = pack_header({"pad": b"h" * 40_000})
    payload = os.urandom(3 << 20)
    head = encode_head(MsgKind.CHUNK_DATA, Flags.NONE, 7, len(header), len(payload))
    first = len(head) + len(header)
    limits = {"none": None, "inside_head": 5, "head_exactly": first,
              "inside_payload": first + 100_000, "all": first + len(payload)}  # fmt: skip

    async def main() -> None:
        loop_ = asyncio.get_running_loop()
        a, b = socket.socketpair()
        stingy = _Stingy(a.family, a.type, a.proto, fileno=a.detach())
        stingy.limit = limits[taken]
        _Stingy.calls = 0
        sender = SocketWire(stingy, "b", 1 << 16, 1 << 30)
        receiver = SocketWire(b, "a", 1 << 16, 1 << 30)
        sending = loop_.create_task(sender.send_frame(head, header, memoryview(payload)))
        frame, raw = await receiver.recv_head()
        dest = bytearray(frame.payload_len)
        await receiver.recv_payload(frame, memoryview(dest))
        await sending
        assert (frame.request_id, raw, bytes(dest)) == (7, header, payload)
        assert _Stingy.calls == 1
        await sender.close()
        await receiver.close()

    runner = uvloop.run if loop == "uvloop" else asyncio.run
    runner(asyncio.wait_for(main(), 30))
