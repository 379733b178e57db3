"""The peer wire format: one frame = fixed binary head + msgpack header + raw payload.

::

    offset size  field
    0      4     magic            b"MKVP"
    4      1     wire version     WIRE_VERSION (the frame layout; protocol features are
                                  negotiated separately in the HELLO exchange)
    5      1     flags            Flags bits; unknown bits are an error
    6      2     kind             MsgKind (append-only enum)
    8      8     request id       matches a response to its request
    16     4     header length    bytes of msgpack header that follow the head
    20     8     payload length   raw payload bytes that follow the header
    28           (msgpack header, then payload)

All integers are little-endian. The payload is never encoded: it goes from the sender's
buffer (e.g. a shared-memory arena slot) to the receiver's buffer as raw bytes. Anything
malformed raises ``ProtocolError`` with a message that names the problem; the connection
that carried it is dropped, never the process.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from meshkv.errors import ProtocolError

MAGIC = b"MKVP"
WIRE_VERSION = 1

PROTOCOL_VERSION = 3
"""Newest peer protocol version this build speaks (negotiated in HELLO). Version 2 adds
``TRANSFER_DONE`` and the ``wait`` field of ``CHUNK_GET`` (ignored by version 1); version 3
adds ``TRANSFER_RENEW``."""
MIN_PROTOCOL_VERSION = 1
"""Oldest peer protocol version this build still accepts."""

MAX_HEADER_BYTES = 64 * 1024
"""Largest msgpack header a peer may send; larger frames are rejected before reading."""
MAX_PAYLOAD_BYTES = 1 << 30
"""Largest raw payload of one frame (a chunk is a few MiB; this is a sanity bound)."""

_HEAD = struct.Struct("<4sBBHQIQ")
HEAD_BYTES = _HEAD.size
MAX_REQUEST_ID = (1 << 64) - 1


class MsgKind(enum.IntEnum):
    """Message kinds. Append-only: never renumber or reuse a value; gaps leave room."""

    HELLO = 1
    AUTH = 2
    ERROR = 3
    PING = 10
    ACK = 11
    PING_REQ = 12
    GOSSIP = 13
    PUSH_PULL = 14
    DIR_ANNOUNCE = 20
    DIR_LOOKUP = 21
    DIR_REPLY = 22
    CHUNK_GET = 30
    CHUNK_DATA = 31
    CHUNK_PUSH = 32
    TRANSFER_DONE = 33
    """One-way: the consumer of a prefill/decode transfer is done with its chunks."""
    TRANSFER_RENEW = 34
    """One-way: the consumer still wants these transfers (its request is queued): hold on."""
    NODE_STATS = 40


HANDSHAKE_KINDS = frozenset({MsgKind.HELLO, MsgKind.AUTH, MsgKind.ERROR})

KIND_SINCE: dict[MsgKind, int] = {MsgKind.TRANSFER_DONE: 2, MsgKind.TRANSFER_RENEW: 3}
"""The protocol version that introduced a kind (absent: 1). Never sent to older peers."""
_KINDS = frozenset(int(k) for k in MsgKind)


class Flags(enum.IntFlag):
    """Frame flag bits."""

    NONE = 0
    RESPONSE = 0x01
    """This frame answers the request with the same request id."""
    ONEWAY = 0x02
    """The sender expects no response (gossip, announcements)."""


_KNOWN_FLAGS = int(Flags.RESPONSE | Flags.ONEWAY)


@dataclass(frozen=True, slots=True)
class FrameHead:
    """The decoded fixed head of one frame."""

    kind: MsgKind
    flags: Flags
    request_id: int
    header_len: int
    payload_len: int


def encode_head(
    kind: MsgKind, flags: Flags, request_id: int, header_len: int, payload_len: int
) -> bytes:
    """Pack the fixed head; the caller's lengths are checked against the limits."""
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
    if payload_len > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {payload_len} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return _HEAD.pack(
        MAGIC, WIRE_VERSION, int(flags), int(kind), request_id, header_len, payload_len
    )


def decode_head(
    data: bytes | bytearray | memoryview,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> FrameHead:
    """Unpack and validate a fixed head (exactly ``HEAD_BYTES`` bytes)."""
    if len(data) != HEAD_BYTES:
        raise ProtocolError(f"truncated frame head: {len(data)} of {HEAD_BYTES} bytes")
    magic, version, flags, kind, request_id, header_len, payload_len = _HEAD.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != WIRE_VERSION:
        raise ProtocolError(f"unsupported wire version {version} (this build: {WIRE_VERSION})")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown frame flags 0x{flags:02x}")
    if kind not in _KINDS:
        raise ProtocolError(f"unknown message kind {kind}")
    if header_len > max_header_bytes:
        raise ProtocolError(f"frame header of {header_len} bytes exceeds {max_header_bytes}")
    if payload_len > max_payload_bytes:
        raise ProtocolError(f"frame payload of {payload_len} bytes exceeds {max_payload_bytes}")
    return FrameHead(MsgKind(kind), Flags(flags), request_id, header_len, payload_len)


def pack_header(header: dict[str, Any]) -> bytes:
    """Encode a message header (a str-keyed map of msgpack-able values)."""
    if not isinstance(header, dict):
        raise ProtocolError(f"message header must be a dict, got {type(header).__name__}")
    try:
        data: bytes = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"message header cannot be encoded: {exc}") from exc
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    return data


def unpack_header(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decode and validate a message header; anything but a str-keyed map is an error."""
    if len(data) == 0:
        return {}
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"malformed msgpack header: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"message header must be a map, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ProtocolError(f"message header keys must be strings, got {key!r}")
    return value
