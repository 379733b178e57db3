"""The local-channel codec (sans-IO): framing, limits, version negotiation, validation."""

from __future__ import annotations

import struct

import msgpack
import pytest

from meshkv.errors import ProtocolError, VersionMismatch, error_from_code
from meshkv.protocol import (
    MAX_FRAME_BYTES,
    MAX_KEYS_PER_REQUEST,
    PROTOCOL_MAX_VERSION,
    PROTOCOL_MIN_VERSION,
    FrameReader,
    decode_body,
    encode,
    error_reply,
    negotiate,
    parse_float,
    parse_ints,
    parse_keys,
    prefix_length,
)


def test_round_trip_and_byte_at_a_time() -> None:
    messages = [{"op": "lookup", "id": i, "keys": [bytes([i]) * 16]} for i in range(5)]
    stream = b"".join(encode(m) for m in messages)
    assert stream[:4] == struct.pack(">I", len(stream) // 5 - 4)
    whole = [decode_body(b) for b in FrameReader().feed(stream)]
    assert whole == messages
    reader = FrameReader()
    got = []
    for i in range(len(stream)):
        got.extend(decode_body(b) for b in reader.feed(stream[i : i + 1]))
    assert got == messages and reader.pending == 0


def test_partial_frame_is_pending_until_complete() -> None:
    frame = encode({"op": "ping", "id": 1})
    reader = FrameReader()
    assert list(reader.feed(frame[:3])) == []
    assert list(reader.feed(frame[3:-1])) == []
    assert reader.pending == len(frame) - 1
    assert [decode_body(b) for b in reader.feed(frame[-1:])] == [{"op": "ping", "id": 1}]


def test_oversized_frame_is_refused_from_its_prefix() -> None:
    reader = FrameReader()
    with pytest.raises(ProtocolError, match="exceeds"):
        list(reader.feed(struct.pack(">I", MAX_FRAME_BYTES + 1)))
    with pytest.raises(ProtocolError, match="exceeds"):
        encode({"blob": b"x" * (MAX_FRAME_BYTES + 1)})


def test_undecodable_and_non_map_bodies() -> None:
    with pytest.raises(ProtocolError, match="undecodable"):
        decode_body(b"\xc1")
    with pytest.raises(ProtocolError, match="undecodable"):
        decode_body(msgpack.packb({"op": "hello", "id": 1})[:-2])
    with pytest.raises(ProtocolError, match="must be a msgpack map"):
        decode_body(msgpack.packb([1, 2]))


def test_version_negotiation() -> None:
    assert negotiate(PROTOCOL_MIN_VERSION, PROTOCOL_MAX_VERSION + 3) == PROTOCOL_MAX_VERSION
    with pytest.raises(VersionMismatch, match="agent speaks"):
        negotiate(PROTOCOL_MAX_VERSION + 1, PROTOCOL_MAX_VERSION + 2)
    with pytest.raises(VersionMismatch):
        negotiate(0, PROTOCOL_MIN_VERSION - 1)
    with pytest.raises(ProtocolError, match="integers"):
        negotiate("1", 2)


def test_key_and_field_validation() -> None:
    good = [b"a" * 16, b"b" * 16]
    assert parse_keys({"keys": good}) == good
    with pytest.raises(ProtocolError, match="key 1 is 15 bytes"):
        parse_keys({"keys": [b"a" * 16, b"b" * 15]})
    with pytest.raises(ProtocolError, match="key 0 is str"):
        parse_keys({"keys": ["a" * 16]})
    with pytest.raises(ProtocolError, match="limit"):
        parse_keys({"keys": [b"a" * 16] * (MAX_KEYS_PER_REQUEST + 1)})
    with pytest.raises(ProtocolError, match="one per key"):
        parse_ints({"sizes": [1]}, "sizes", 2)
    with pytest.raises(ProtocolError, match=r"sizes\[1\]"):
        parse_ints({"sizes": [1, 0]}, "sizes", 2, minimum=1)
    with pytest.raises(ProtocolError, match="sizes"):
        parse_ints({"sizes": [1, True]}, "sizes", 2)
    assert parse_float({"wait": 100}, "wait", 0.0, 30.0) == 30.0
    with pytest.raises(ProtocolError):
        parse_float({"wait": -1}, "wait", 0.0, 30.0)


def test_error_reply_round_trips_to_the_same_class() -> None:
    reply = error_reply(7, VersionMismatch("no overlap"))
    assert reply == {"id": 7, "error": {"code": "version", "message": "no overlap"}}
    exc = error_from_code(reply["error"]["code"], reply["error"]["message"])
    assert isinstance(exc, VersionMismatch) and str(exc) == "no overlap"


def test_prefix_length() -> None:
    assert prefix_length([]) == 0
    assert prefix_length(["cpu", "ssd", None, "cpu"]) == 2
    assert prefix_length(["cpu", "peer"]) == 2
    assert prefix_length([None, "cpu"]) == 0
