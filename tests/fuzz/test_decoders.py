"""Property tests of every decoder that reads bytes from outside the process.

Each fuzz target of ``tests/fuzz/targets.py`` gets random bytes and, more usefully,
inputs built from valid encodings with fields swapped for values of any type (strategies
below), so the checks behind the framing are reached. The targets raise ``Finding`` when
a decoder breaks its contract (an error other than the project's own, an accepted value
out of range, a length that passed its limit). ``make fuzz`` runs the same targets under
atheris for minutes each.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshkv.chunk import RecordHeader
from meshkv.errors import ProtocolError
from meshkv.integrations.vllm.transfer import parse_consumer, producer_params
from meshkv.mesh import messages as mm
from meshkv.protocol import LENGTH_PREFIX
from meshkv.transport.framing import Flags, MsgKind, encode_head
from tests.fuzz import targets

FAST = settings(
    max_examples=int(os.environ.get("MESHKV_HYPOTHESIS_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # The same examples every run in `make test` (a new random input must not turn CI red
    # by chance); MESHKV_HYPOTHESIS_RANDOM=1 explores, and `make fuzz` runs the coverage-
    # guided fuzzer for the long search.
    derandomize=os.environ.get("MESHKV_HYPOTHESIS_RANDOM") != "1",
)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=24)
    | st.binary(max_size=24)
    | st.sampled_from([b"k" * 16, "00" * 16, 0, -1, 1 << 40, 2.5, ""])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6)
    ),
    max_leaves=20,
)


def mutate(draw: st.DrawFn, obj: Any, depth: int = 0) -> Any:
    """``obj`` with some of its fields (at any depth) replaced by arbitrary values."""
    if depth > 4 or draw(st.integers(0, 5)) == 0:
        return draw(VALUES)
    if isinstance(obj, list):
        out = [mutate(draw, x, depth + 1) if draw(st.booleans()) else x for x in obj]
        if draw(st.integers(0, 6)) == 0:
            out = out[: draw(st.integers(0, len(out)))]
        return out
    if isinstance(obj, dict):
        return {k: mutate(draw, v, depth + 1) if draw(st.booleans()) else v for k, v in obj.items()}
    return obj


# --- valid encodings to start from --------------------------------------------------------

KEY = b"\x01" * 16
UPDATE = mm.Update("n1", "127.0.0.1:7000", 3, mm.State.SUSPECT, "n2")
MESSAGES: list[mm.Message] = [
    mm.Ping(1, "n1", "fuzz", (UPDATE,)),
    mm.Ack(1, "n1", (UPDATE,)),
    mm.PingReq(2, "n1", "n3", "127.0.0.1:7002", (UPDATE,)),
    mm.Nack(2, "n1"),
    mm.Gossip("n1", (UPDATE, UPDATE)),
    mm.PushPull("n1", (UPDATE,), True, False),
    mm.Announce("n1", (KEY,), ()),
    mm.Handoff("n1", ((KEY, ("n1", "n2")),)),
    mm.Lookup(5, "n1", (KEY, KEY)),
    mm.LookupReply(5, "n1", (("n1", "n2"), ())),
]
KIND_OF = {
    mm.Ping: MsgKind.PING, mm.Ack: MsgKind.ACK, mm.PingReq: MsgKind.PING_REQ,
    mm.Nack: MsgKind.ACK, mm.Gossip: MsgKind.GOSSIP, mm.PushPull: MsgKind.PUSH_PULL,
    mm.Announce: MsgKind.DIR_ANNOUNCE, mm.Handoff: MsgKind.DIR_ANNOUNCE,
    mm.Lookup: MsgKind.DIR_LOOKUP, mm.LookupReply: MsgKind.DIR_REPLY,
}  # fmt: skip
RECORD = RecordHeader(b"\x02" * 16, KEY, 16, 64, 12345)


def test_valid_mesh_messages_round_trip() -> None:
    for msg in MESSAGES:
        wire = msgpack.unpackb(msgpack.packb(msg.to_wire()), raw=False)
        assert mm.decode(wire) == msg


@st.composite
def mesh_wire(draw: st.DrawFn) -> tuple[MsgKind, Any]:
    msg = draw(st.sampled_from(MESSAGES))
    return KIND_OF[type(msg)], mutate(draw, msg.to_wire())


@st.composite
def peer_stream(draw: st.DrawFn) -> bytes:
    """Up to 4 frames: heads with real or bogus kinds, flags and lengths; headers that are
    mutated mesh messages, chunk requests, or junk; payload bytes that may fall short."""
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            kind, m = draw(mesh_wire())
            header: Any = {"m": m, "src": draw(st.sampled_from(["127.0.0.1:1", "", 5]))}
        elif choice == 1:
            kind = MsgKind.CHUNK_GET
            header = mutate(draw, {"ns": KEY, "key": KEY, "wait": 0.5})
        elif choice == 2:
            kind = MsgKind.CHUNK_PUSH
            header = mutate(draw, {"push": 7, "record": RECORD.pack()})
        else:
            kind = draw(st.sampled_from(list(MsgKind)))
            header = draw(VALUES)
        raw = msgpack.packb(header, use_bin_type=True)
        payload_len = draw(st.sampled_from([0] * 6 + [8, targets.MAX_PAYLOAD + 1, 1 << 40]))
        flags = draw(st.sampled_from([Flags.NONE] * 4 + [Flags.ONEWAY, Flags(0x80)]))
        head = bytearray(encode_head(kind, Flags.NONE, draw(st.integers(0, 1 << 20)), len(raw), 0))
        head[5] = int(flags)  # flags byte, unchecked by encode_head
        struct.pack_into("<Q", head, len(head) - 8, payload_len)
        if draw(st.integers(0, 16)) == 0:
            head[draw(st.integers(0, len(head) - 1))] ^= 0xFF
        out += bytes(head) + raw + draw(st.binary(max_size=16))
    return out


@st.composite
def local_stream(draw: st.DrawFn) -> bytes:
    base = draw(
        st.sampled_from(
            [
                {"op": "hello", "id": 1, "min_version": 1, "max_version": 1,
                 "namespace": {"model": "m"}},
                {"op": "reserve", "id": 2, "keys": [KEY, KEY], "sizes": [64, 64]},
                {"op": "commit", "id": 3, "keys": [KEY, KEY], "tokens": [16, 16],
                 "checksums": [1, None]},
                {"op": "read", "id": 4, "keys": [KEY], "wait": 0.5, "verify": True},
                {"op": "hold", "id": 5, "keys": [KEY],
                 "transfer": {"id": "t", "hold": 5.0, "push_to": "n2"}},
            ]
        )
    )  # fmt: skip
    body = msgpack.packb(mutate(draw, base), use_bin_type=True)
    size = draw(st.sampled_from([len(body), len(body), len(body) + 3, targets.MAX_FRAME + 1]))
    return LENGTH_PREFIX.pack(size) + body + draw(st.binary(max_size=8))


# --- the properties -------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=512) | local_stream())
def test_local_frames(data: bytes) -> None:
    targets.local_frames(data)


@FAST
@given(st.binary(max_size=512) | peer_stream())
def test_peer_frames(data: bytes) -> None:
    targets.peer_frames(data)


@FAST
@given(mesh_wire())
def test_gossip_and_directory_messages(wire: tuple[MsgKind, Any]) -> None:
    targets.gossip(msgpack.packb(wire[1], use_bin_type=True))


@FAST
@given(st.binary(max_size=256))
def test_gossip_raw_bytes(data: bytes) -> None:
    targets.gossip_raw(data)


@st.composite
def hello_frames(draw: st.DrawFn) -> bytes:
    hello = mutate(draw, {"node": "stranger", "min": 1, "max": 2, "nonce": b"\x00" * 16})
    raw = msgpack.packb(hello, use_bin_type=True)
    kind = draw(st.sampled_from([MsgKind.HELLO, MsgKind.HELLO, MsgKind.AUTH, MsgKind.ERROR]))
    auth = msgpack.packb(mutate(draw, {"mac": b"\x00" * 32}), use_bin_type=True)
    return (
        encode_head(kind, Flags.NONE, 0, len(raw), 0)
        + raw
        + encode_head(MsgKind.AUTH, Flags.NONE, 0, len(auth), 0)
        + auth
    )


@FAST
@given(st.binary(max_size=256) | hello_frames())
def test_handshake_never_admits_a_stranger(data: bytes) -> None:
    targets.handshake(data)


@FAST
@given(st.binary(max_size=128))
def test_record_header(data: bytes) -> None:
    targets.record_header(data)


@st.composite
def ssd_files(draw: st.DrawFn) -> bytes:
    payload = draw(st.binary(max_size=96))
    aligned = draw(st.booleans())  # both layouts: FLAG_ALIGNED pads header and payload
    header = bytearray(
        RecordHeader(b"\x02" * 16, b"\x00" * 16, 4, len(payload), 9, int(aligned)).pack()
    )
    for _ in range(draw(st.integers(0, 2))):
        header[draw(st.integers(0, len(header) - 1))] ^= draw(st.integers(1, 255))
    if aligned:
        header += bytes(4096 - len(header))
        payload += bytes(-len(payload) % 4096)
    cut = draw(st.integers(0, len(header) + len(payload) + 4))
    return (bytes(header) + payload + draw(st.binary(max_size=4)))[:cut]


@FAST
@given(ssd_files())
def test_ssd_file(data: bytes) -> None:
    targets.ssd_file(data)


ENGINE = {"model": "/models/m", "dtype": "float16", "num_layers": 2, "tp_size": 1,
          "extra": {"drafter": "eagle:/models/d"}}  # fmt: skip
VALID_PARAMS = producer_params(
    producer="n1", transfer_id="t-1", tokens=300, chunk_tokens=256, last_key=KEY, expires=5.0,
    engine=ENGINE,
)  # fmt: skip


def test_valid_transfer_params_round_trip() -> None:
    got = parse_consumer(json.loads(json.dumps(VALID_PARAMS)))
    assert got is not None and got.producer == "n1" and got.last_key == KEY
    assert got.engine == ENGINE


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1 << 63:
        return 1
    return value


@FAST
@given(st.data())
def test_kv_transfer_params(data: st.DataObject) -> None:
    params = _jsonable(mutate(data.draw, VALID_PARAMS))
    targets.kv_transfer_params(json.dumps(params).encode())


@FAST
@given(st.data())
def test_http_prefix_body(data: st.DataObject) -> None:
    body = _jsonable(mutate(data.draw, {"token_ids": [1, 2, 3, 4], "model": "m"}))
    targets.http_prefix(json.dumps(body).encode())


TOML_SCALARS = st.sampled_from(
    ["1", "-1", "0", "1.5", "true", '"lru"', '"x"', '""', "[1, 2]", "{a = 1}", "1e400",
     "18446744073709551616", '"/nonexistent"', '"127.0.0.1:0"', '"::1:99999"']
)  # fmt: skip
TOML_KEYS = st.sampled_from(
    ["cpu_bytes", "capacity_bytes", "segment_bytes", "min_slot_bytes", "eviction",
     "reserve_timeout_s", "max_lease_s", "directory", "workers", "http", "socket",
     "node_id", "lease_seconds", "write_through", "seeds", "peer_port", "replicas", "x"]
)  # fmt: skip


@st.composite
def toml_texts(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 3)) == 0:
            lines.append(draw(st.sampled_from(["[store]", "[store.cpu]", "[store.ssd]",
                                               "[mesh]", "[agent]", "[[store]]"])))  # fmt: skip
        lines.append(f"{draw(TOML_KEYS)} = {draw(TOML_SCALARS)}")
    text = "\n".join(lines).encode()
    if draw(st.integers(0, 6)) == 0:
        text += draw(st.binary(max_size=8))
    return text


@FAST
@given(toml_texts())
def test_toml_config(data: bytes) -> None:
    targets.toml_config(data)


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_targets_reject_known_bad_inputs_quietly(name: str) -> None:
    """Each target runs on a few fixed inputs (empty, junk, oversized lengths)."""
    for data in (b"", b"\x00", b"\xff" * 64, LENGTH_PREFIX.pack(1 << 31) + b"x"):
        targets.TARGETS[name](data)


def test_a_contract_breach_is_reported() -> None:
    """The harness itself: a decoder raising a foreign exception is a finding."""
    with pytest.raises(targets.Finding, match="KeyError"), targets.own_errors():
        raise KeyError("boom")
    with targets.own_errors():
        raise ProtocolError("rejected, as designed")
