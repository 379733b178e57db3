"""Frame encoding, validation errors, addresses and config checks."""

from __future__ import annotations

import struct

import msgpack
import pytest

from meshkv.errors import ConfigError, ProtocolError
from meshkv.transport.base import Message, TransportConfig, format_address, parse_address
from meshkv.transport.framing import (
    HEAD_BYTES,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    WIRE_VERSION,
    Flags,
    MsgKind,
    decode_head,
    encode_head,
    pack_header,
    unpack_header,
)

_HEAD = struct.Struct("<4sBBHQIQ")


def test_head_round_trip() -> None:
    head = encode_head(MsgKind.CHUNK_DATA, Flags.RESPONSE, 2**63 + 5, 17, 16 << 20)
    assert len(head) == HEAD_BYTES == 28
    frame = decode_head(head)
    assert frame.kind is MsgKind.CHUNK_DATA
    assert frame.flags == Flags.RESPONSE
    assert frame.request_id == 2**63 + 5
    assert (frame.header_len, frame.payload_len) == (17, 16 << 20)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ((b"HTTP", WIRE_VERSION, 0, 10, 1, 0, 0), "bad frame magic"),
        ((MAGIC, 99, 0, 10, 1, 0, 0), "unsupported wire version 99"),
        ((MAGIC, WIRE_VERSION, 0x80, 10, 1, 0, 0), "unknown frame flags 0x80"),
        ((MAGIC, WIRE_VERSION, 0, 999, 1, 0, 0), "unknown message kind 999"),
        ((MAGIC, WIRE_VERSION, 0, 10, 1, MAX_HEADER_BYTES + 1, 0), "frame header of"),
        ((MAGIC, WIRE_VERSION, 0, 10, 1, 0, MAX_PAYLOAD_BYTES + 1), "frame payload of"),
    ],
)
def test_bad_heads_are_named(fields: tuple[object, ...], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_head(_HEAD.pack(*fields))


def test_truncated_head() -> None:
    head = encode_head(MsgKind.PING, Flags.NONE, 1, 0, 0)
    with pytest.raises(ProtocolError, match="truncated frame head: 27 of 28"):
        decode_head(head[:-1])


def test_configured_limits_are_enforced() -> None:
    head = encode_head(MsgKind.CHUNK_PUSH, Flags.NONE, 1, 10, 4096)
    with pytest.raises(ProtocolError, match="exceeds 1024"):
        decode_head(head, max_payload_bytes=1024)
    with pytest.raises(ProtocolError, match="exceeds 8"):
        decode_head(head, max_header_bytes=8)


def test_encode_refuses_oversized() -> None:
    with pytest.raises(ProtocolError, match="payload of"):
        encode_head(MsgKind.CHUNK_DATA, Flags.NONE, 1, 0, MAX_PAYLOAD_BYTES + 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        pack_header({"blob": b"x" * (MAX_HEADER_BYTES + 1)})


def test_header_round_trip_and_validation() -> None:
    header = {"key": b"\x01" * 16, "n": 3, "tiers": ["cpu", None]}
    assert unpack_header(pack_header(header)) == header
    assert unpack_header(b"") == {}
    with pytest.raises(ProtocolError, match="must be a map"):
        unpack_header(msgpack.packb([1, 2]))
    with pytest.raises(ProtocolError, match="malformed msgpack header"):
        unpack_header(b"\xc1\xc1\xc1")
    with pytest.raises(ProtocolError, match="malformed msgpack header"):
        unpack_header(msgpack.packb({1: 2}))  # strict_map_key refuses int keys
    with pytest.raises(ProtocolError, match="cannot be encoded"):
        pack_header({"x": object()})


def test_msgkind_values_are_stable() -> None:
    # Append-only: these numbers are on the wire; changing one breaks old peers.
    expected = {
        "HELLO": 1,
        "AUTH": 2,
        "ERROR": 3,
        "PING": 10,
        "ACK": 11,
        "PING_REQ": 12,
        "GOSSIP": 13,
        "PUSH_PULL": 14,
        "DIR_ANNOUNCE": 20,
        "DIR_LOOKUP": 21,
        "DIR_REPLY": 22,
        "CHUNK_GET": 30,
        "CHUNK_DATA": 31,
        "CHUNK_PUSH": 32,
        "TRANSFER_DONE": 33,
        "TRANSFER_RENEW": 34,
        "NODE_STATS": 40,
    }
    assert {k.name: int(k) for k in MsgKind} == expected


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("node-1:0", ("node-1", 0)),
        ("[::1]:7000", ("::1", 7000)),
    ],
)
def test_parse_address(text: str, parsed: tuple[str, int]) -> None:
    assert parse_address(text) == parsed
    assert format_address(*parsed) == text


@pytest.mark.parametrize("bad", ["nohost", ":80", "h:port", "h:70000", "::1:80", "[::1]80"])
def test_parse_address_rejects(bad: str) -> None:
    with pytest.raises(ConfigError, match="bad peer address"):
        parse_address(bad)


def test_config_validation() -> None:
    TransportConfig(secret=b"s" * 16, node_id="a")
    with pytest.raises(ConfigError, match="secret"):
        TransportConfig(secret=b"short", node_id="a")
    with pytest.raises(ConfigError, match="node_id"):
        TransportConfig(secret=b"s" * 16, node_id="")
    with pytest.raises(ConfigError, match="max_payload_bytes"):
        TransportConfig(secret=b"s" * 16, node_id="a", max_payload_bytes=0)
    with pytest.raises(ConfigError, match="protocol versions"):
        TransportConfig(secret=b"s" * 16, node_id="a", min_protocol_version=4)


def test_message_checks_types() -> None:
    with pytest.raises(TypeError, match="MsgKind"):
        Message(30, {})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dict"):
        Message(MsgKind.PING, [])  # type: ignore[arg-type]
