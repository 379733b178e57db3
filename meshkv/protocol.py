"""The local channel's wire format: frames, op codes, limits and version negotiation.

Engines on the node talk to their agent through a Unix-domain socket. The socket carries
control only; chunk bytes move through the shared-memory arena. Every frame is a 4-byte
big-endian length followed by one msgpack map::

    request  {"op": "<op>", "id": <int>, ...fields}
    reply    {"id": <int>, ...fields}          or
             {"id": <int>, "error": {"code": "<errors.py code>", "message": "..."}}

The op set is append-only (``Op``); the protocol version is negotiated at ``hello``: the
client sends the range it speaks, the agent picks the highest common version or replies
``VersionMismatch`` and closes. This module is sans-IO: the agent's server and the
blocking client share it. Field-by-field documentation lives in ``docs/local-protocol.md``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from typing import Any

import msgpack

from meshkv.chunk import KEY_BYTES, ChunkKey
from meshkv.errors import MeshKVError, ProtocolError, VersionMismatch

PROTOCOL_MIN_VERSION = 1
PROTOCOL_MAX_VERSION = 2
"""Versions of the local protocol this build speaks (inclusive). Version 2 adds the
``transfers`` op; a client sends it only to an agent that negotiated 2."""

MAX_FRAME_BYTES = 1 << 20
"""Largest frame body either side accepts; a larger length prefix closes the connection."""

MAX_KEYS_PER_REQUEST = 4096
"""Most keys one request may carry (4096 chunks of 256 tokens = 1M tokens)."""

LENGTH_PREFIX = struct.Struct(">I")
PREFIX_BYTES = LENGTH_PREFIX.size


class Op(enum.StrEnum):
    """Request kinds. Append-only: never renumber, rename or reuse."""

    HELLO = "hello"
    PING = "ping"
    LOOKUP = "lookup"
    RESERVE = "reserve"
    COMMIT = "commit"
    ABORT = "abort"
    READ = "read"
    RELEASE = "release"
    STATS = "stats"
    HOLD = "hold"
    TRANSFERS = "transfers"
    """Version 2: renew or abandon prefill/decode transfers this node's engine waits for."""


OPS: frozenset[str] = frozenset(op.value for op in Op)

_packer = msgpack.Packer(use_bin_type=True)


def encode(message: dict[str, Any]) -> bytes:
    """One frame (length prefix + msgpack body) for ``message``."""
    body: bytes = _packer.pack(message)
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return LENGTH_PREFIX.pack(len(body)) + body


def unpack_body(body: bytes | bytearray | memoryview) -> Any:
    """Parse one frame body; raises ``ProtocolError`` if it is not one msgpack object."""
    try:
        return msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"undecodable frame ({len(body)} bytes): {exc}") from exc


def decode_body(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse one frame body; raises ``ProtocolError`` unless it is a msgpack map."""
    message = unpack_body(body)
    if not isinstance(message, dict):
        raise ProtocolError(f"frame must be a msgpack map, got {type(message).__name__}")
    return message


def error_reply(request_id: int | None, exc: MeshKVError) -> dict[str, Any]:
    """The reply that carries ``exc`` back to the caller (``error_from_code`` rebuilds it)."""
    return {"id": request_id, "error": {"code": exc.code, "message": str(exc)}}


class FrameReader:
    """Sans-IO frame splitter: feed bytes, take whole frame bodies.

    A frame whose length prefix exceeds ``max_frame`` raises ``ProtocolError``; the caller
    then closes the connection, because the stream can no longer be re-synchronised.
    """

    __slots__ = ("_buffer", "_max_frame")

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        """Add ``data`` and yield every complete frame body it finishes."""
        buf = self._buffer
        if not buf:
            # Fast path: a whole small request usually arrives in one read; decode it
            # straight from ``data`` without copying into the buffer.
            view = memoryview(data)
            offset = 0
            while len(view) - offset >= PREFIX_BYTES:
                (size,) = LENGTH_PREFIX.unpack_from(view, offset)
                self._check(size)
                end = offset + PREFIX_BYTES + size
                if end > len(view):
                    break
                yield bytes(view[offset + PREFIX_BYTES : end])
                offset = end
            if offset < len(view):
                buf += view[offset:]
            return
        buf += data
        while len(buf) >= PREFIX_BYTES:
            (size,) = LENGTH_PREFIX.unpack_from(buf, 0)
            self._check(size)
            end = PREFIX_BYTES + size
            if end > len(buf):
                return
            body = bytes(buf[PREFIX_BYTES:end])
            del buf[:end]
            yield body

    def _check(self, size: int) -> None:
        if size > self._max_frame:
            raise ProtocolError(
                f"frame of {size} bytes exceeds the {self._max_frame}-byte limit; "
                "closing this connection"
            )


def negotiate(client_min: Any, client_max: Any) -> int:
    """The version the agent speaks with a client that offers ``[client_min, client_max]``."""
    if not isinstance(client_min, int) or not isinstance(client_max, int):
        raise ProtocolError("hello: min_version and max_version must be integers")
    low = max(client_min, PROTOCOL_MIN_VERSION)
    high = min(client_max, PROTOCOL_MAX_VERSION)
    if low > high:
        raise VersionMismatch(
            f"client speaks local protocol {client_min}..{client_max}, "
            f"agent speaks {PROTOCOL_MIN_VERSION}..{PROTOCOL_MAX_VERSION}"
        )
    return high


def parse_keys(message: dict[str, Any], field: str = "keys") -> list[ChunkKey]:
    """Validate a request's key list (each key 16 bytes, at most ``MAX_KEYS_PER_REQUEST``)."""
    keys = message.get(field)
    if not isinstance(keys, list):
        raise ProtocolError(f"{field!r} must be a list of {KEY_BYTES}-byte keys")
    if len(keys) > MAX_KEYS_PER_REQUEST:
        raise ProtocolError(f"{len(keys)} keys in one request; the limit is {MAX_KEYS_PER_REQUEST}")
    for i, key in enumerate(keys):
        if type(key) is not bytes or len(key) != KEY_BYTES:
            got = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
            raise ProtocolError(f"key {i} is {got}; keys are {KEY_BYTES} bytes")
    return keys


def parse_ints(message: dict[str, Any], field: str, count: int, *, minimum: int = 0) -> list[int]:
    """Validate a per-key integer list (sizes, token counts) of length ``count``."""
    values = message.get(field)
    if not isinstance(values, list) or len(values) != count:
        raise ProtocolError(f"{field!r} must be a list of {count} integers, one per key")
    for i, value in enumerate(values):
        if type(value) is not int or value < minimum:
            raise ProtocolError(f"{field}[{i}] must be an integer >= {minimum}, got {value!r}")
    return values


def parse_optional_ints(message: dict[str, Any], field: str, count: int) -> list[int | None]:
    """Like ``parse_ints`` but the field may be absent and entries may be nil."""
    values = message.get(field)
    if values is None:
        return [None] * count
    if not isinstance(values, list) or len(values) != count:
        raise ProtocolError(f"{field!r} must be a list of {count} integers or nils")
    for i, value in enumerate(values):
        if value is not None and (type(value) is not int or value < 0):
            raise ProtocolError(f"{field}[{i}] must be a non-negative integer or nil")
    return values


def parse_float(message: dict[str, Any], field: str, default: float, maximum: float) -> float:
    """A bounded non-negative number (e.g. a wait in seconds)."""
    value = message.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ProtocolError(f"{field!r} must be a non-negative number, got {value!r}")
    return min(float(value), maximum)


def prefix_length(tiers: list[Any]) -> int:
    """Chunks in the longest prefix whose every chunk is stored somewhere."""
    try:
        return tiers.index(None)
    except ValueError:
        return len(tiers)
