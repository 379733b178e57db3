"""Fuzz targets: one per decoder that reads bytes from outside the process.

Each target takes one input (``bytes``) and feeds it to the real decoder. The invariant
everywhere: a decoder either accepts its input or raises the project's own error type
(``MeshKVError``; ``ValueError`` for the HTTP query parser, whose handler turns it into a
400) -- never another exception, never a hang, and no length field allocates before it is
checked against its limit (the limits given below are small, so a violation shows up as an
allocation the target can see, or a ``MemoryError``). A target that finds anything else
raises ``AssertionError`` (``Finding``) with the input's cause attached.

The same targets run under hypothesis in the suite (``tests/fuzz/test_decoders.py``) and
under atheris (libFuzzer, coverage-guided) in ``make fuzz`` (``tests/fuzz/run.py``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import xxhash

from meshkv.chunk import RECORD_HEADER_BYTES, RecordHeader
from meshkv.errors import MeshKVError
from meshkv.integrations.vllm.transfer import engine_differences, parse_consumer, parse_producer
from meshkv.mesh import messages as mm
from meshkv.mesh.config import DirectoryConfig, MembershipConfig
from meshkv.mesh.directory import Directory
from meshkv.mesh.membership import Membership
from meshkv.mesh.peer_server import _bytes16, _core_message, _field, _push_id
from meshkv.protocol import (
    FrameReader,
    negotiate,
    parse_float,
    parse_ints,
    parse_keys,
    parse_optional_ints,
    unpack_body,
)
from meshkv.server.local import parse_rank_keys
from meshkv.server.prefix import parse_query
from meshkv.server.transfer_fields import parse_transfer_hold
from meshkv.transport.base import TransportConfig
from meshkv.transport.framing import MsgKind
from meshkv.transport.handshake import server_handshake
from meshkv.transport.stream import StreamWire

logging.getLogger("meshkv").setLevel(logging.CRITICAL)
logging.getLogger("transport").setLevel(logging.CRITICAL)

MAX_FRAME = 64 << 10
"""Local-channel frame limit used by the fuzz targets (the agent's is 1 MiB)."""
MAX_HEADER = 4 << 10
MAX_PAYLOAD = 64 << 10
"""Peer-frame limits used here: a payload length above them must fail before any buffer
of that size exists."""


class Finding(AssertionError):
    """A decoder broke its contract on this input."""


@contextlib.contextmanager
def own_errors(*allowed: type[BaseException]) -> Iterator[None]:
    """Let ``MeshKVError`` (and ``allowed``) through as "rejected"; anything else is a
    finding."""
    try:
        yield
    except (MeshKVError, *allowed):
        pass
    except Exception as exc:
        raise Finding(f"{type(exc).__name__}: {exc}") from exc


def _splits(data: bytes) -> list[bytes]:
    """Cut ``data`` into pieces at points chosen by its first byte (so a stream decoder
    sees the same bytes arrive in different reads)."""
    if not data:
        return [b""]
    rng = random.Random(data[0])
    cuts = sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1)))
    out, last = [], 0
    for c in cuts:
        out.append(data[last:c])
        last = c
    out.append(data[last:])
    return out


# --- local channel ------------------------------------------------------------------------


def local_frames(data: bytes) -> None:
    """The engine ↔ agent channel: framing, msgpack bodies, and every request field
    validator the server applies."""
    reader = FrameReader(MAX_FRAME)
    with own_errors():
        for piece in _splits(data):
            for body in reader.feed(piece):
                if len(body) > MAX_FRAME:
                    raise Finding(f"frame of {len(body)} bytes passed the {MAX_FRAME} limit")
                _local_message(body)


def _count(keys: Any) -> int:
    """How many keys a request names, as the server counts them once ``keys`` parsed (the
    harness must not fail on a ``keys`` that is not a list: the server rejects it first)."""
    return len(keys) if isinstance(keys, list) else 0


def _local_message(body: bytes) -> None:
    with own_errors():
        message = unpack_body(body)
        if not isinstance(message, dict):
            return
        for check in (
            lambda: negotiate(message.get("min_version"), message.get("max_version")),
            lambda: parse_keys(message),
            lambda: parse_ints(message, "sizes", _count(message.get("keys")), minimum=1),
            lambda: parse_ints(message, "tokens", 2),
            lambda: parse_optional_ints(message, "checksums", 2),
            lambda: parse_float(message, "wait", 0.0, 30.0),
            lambda: parse_transfer_hold(message.get("transfer")),
            lambda: parse_rank_keys(message.get("ranks"), _count(message.get("keys"))),
        ):
            with own_errors():
                check()


# --- peer channel ------------------------------------------------------------------------


class BytesWire(StreamWire):
    """The real stream wire (head/header/payload reads) over bytes in memory, arriving in
    the pieces ``_splits`` cut; what it sends is kept."""

    def __init__(self, data: bytes) -> None:
        super().__init__("fuzz", MAX_HEADER, MAX_PAYLOAD)
        self._pieces = [p for p in _splits(data) if p]
        self.sent: list[bytes] = []

    async def _recv_some(self, view: memoryview) -> int:
        if not self._pieces:
            return 0
        piece = self._pieces[0]
        n = min(len(piece), len(view))
        view[:n] = piece[:n]
        if n < len(piece):
            self._pieces[0] = piece[n:]
        else:
            self._pieces.pop(0)
        return n

    async def _send_all(self, data: bytes | memoryview) -> None:
        self.sent.append(bytes(data))

    def abort(self) -> None:
        self._aborted = True

    async def close(self) -> None:
        self.abort()


_LOOP: asyncio.AbstractEventLoop | None = None


def _run(coro: Any) -> Any:
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(asyncio.wait_for(coro, 5.0))


def peer_frames(data: bytes) -> None:
    """Frames on the peer port after the handshake: the frame head and msgpack header
    (stream wire), payload length limits, and each request's header as the peer server
    validates it (membership and directory messages decoded and handed to real
    membership and directory cores)."""
    _run(_peer_frames(data))


async def _peer_frames(data: bytes) -> None:
    from meshkv.errors import ConnectionClosed  # noqa: PLC0415 (keeps the import list short)
    from meshkv.transport.framing import unpack_header  # noqa: PLC0415

    wire = BytesWire(data)
    cores = _Cores()
    for _ in range(64):
        with own_errors():
            try:
                frame, raw = await wire.recv_head()
            except ConnectionClosed:
                return
            if frame.payload_len > MAX_PAYLOAD or len(raw) > MAX_HEADER:
                raise Finding(f"frame with a {frame.payload_len}-byte payload passed the limit")
            header = unpack_header(raw)
            if frame.payload_len:
                await wire.discard_payload(frame)
            cores.dispatch(frame.kind, header)
            continue
        return  # a rejected frame ends the connection, as in the session


class _Cores:
    """A real membership core and directory core behind the peer server's validators."""

    def __init__(self) -> None:
        rng = random.Random(0)
        self.now = 1000.0
        self.membership = Membership("fuzz", "fuzz:1", MembershipConfig(), rng, self.now)
        self.directory = Directory("fuzz", DirectoryConfig(), rng, self.now)

    def dispatch(self, kind: MsgKind, header: dict[str, Any]) -> None:
        self.now += 0.1
        if kind in (MsgKind.PING, MsgKind.ACK, MsgKind.PING_REQ, MsgKind.GOSSIP,
                    MsgKind.PUSH_PULL):  # fmt: skip
            msg = _core_message(header)
            if isinstance(msg, mm.Ping | mm.Ack | mm.PingReq | mm.Nack | mm.Gossip | mm.PushPull):
                self.membership.handle("peer:1", msg, self.now)
                self.membership.tick(self.now)
        elif kind == MsgKind.DIR_ANNOUNCE:
            msg = _core_message(header)
            if isinstance(msg, mm.Announce | mm.Handoff):
                self.directory.handle("peer:1", msg, self.now)
        elif kind == MsgKind.DIR_LOOKUP:
            msg = _core_message(header)
            if isinstance(msg, mm.Lookup):
                self.directory.handle("peer:1", msg, self.now)
        elif kind == MsgKind.CHUNK_GET:
            _bytes16(header, "ns")
            _bytes16(header, "key")
        elif kind == MsgKind.CHUNK_PUSH:
            _push_id(header)
            RecordHeader.unpack(_field(header, "record", bytes))


def gossip(data: bytes) -> None:
    """Membership and directory messages (the ``m`` field of mesh frames) straight from
    msgpack, into real cores."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:  # not msgpack: the header decoder rejects it first (gossip_raw)
        return
    cores = _Cores()
    with own_errors():
        msg = mm.decode(obj)
        if isinstance(msg, mm.Ping | mm.Ack | mm.PingReq | mm.Nack | mm.Gossip | mm.PushPull):
            cores.membership.handle("peer:1", msg, cores.now)
            cores.membership.tick(cores.now + 5)
        else:
            cores.directory.handle("peer:1", msg, cores.now)


def gossip_raw(data: bytes) -> None:
    """``gossip`` including msgpack's own errors (wrapped as ``ProtocolError`` by the
    header decoder that runs first in the agent)."""
    from meshkv.transport.framing import unpack_header  # noqa: PLC0415

    with own_errors():
        header = unpack_header(data)
        _core_message(header)


_SECRET = b"fuzz-secret-0123456789abcdef"


def handshake(data: bytes) -> None:
    """The server side of the peer handshake reading what a stranger sends."""
    wire = BytesWire(data)
    config = TransportConfig(secret=_SECRET, node_id="fuzz-server")
    with own_errors():
        result = _run(server_handshake(wire, config))
        raise Finding(f"a stranger passed the handshake as {result.peer_node_id!r}")


# --- on disk -------------------------------------------------------------------------------


def record_header(data: bytes) -> None:
    """A chunk record header (SSD files and pushed chunks), as read; then the same body
    with a correct trailer, so the fields behind the checksum are exercised too."""
    with own_errors():
        RecordHeader.unpack(data)
    body_len = RECORD_HEADER_BYTES - 8
    body = (data + bytes(body_len))[:body_len]
    sealed = body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")
    with own_errors():
        h = RecordHeader.unpack(sealed)
        if h.payload_len > 1 << 30:
            raise Finding(f"payload length {h.payload_len} accepted")
        h.verify(b"\0" * min(h.payload_len, 64), None)


_SSD_DIR: Path | None = None


def ssd_file(data: bytes) -> None:
    """A chunk file found at start-up (the SSD tier's scan) and then read back."""
    from meshkv.tiers.ssd import _check_file  # noqa: PLC0415

    global _SSD_DIR
    if _SSD_DIR is None:
        _SSD_DIR = Path(tempfile.mkdtemp(prefix="mkv-fuzz-ssd-"))
        atexit.register(shutil.rmtree, _SSD_DIR, True)  # one per fuzzing process
    stem = "00" * 16
    path = _SSD_DIR / stem
    path.write_bytes(data)
    with own_errors():
        found = _check_file(str(path), stem)
        if found is not None:
            _, key, entry = found
            if entry.file_bytes != len(data):
                raise Finding("a file whose size disagrees with its header was accepted")


# --- engine and HTTP inputs -----------------------------------------------------------------


def kv_transfer_params(data: bytes) -> None:
    """vLLM's ``kv_transfer_params`` (JSON from the client or the proxy): the parsers must
    never raise -- the scheduler calls them -- and return None for anything malformed."""
    try:
        params = json.loads(data)
    except (ValueError, RecursionError):
        return
    try:
        parse_producer(params)
        consumer = parse_consumer(params)
    except Exception as exc:
        raise Finding(f"{type(exc).__name__}: {exc}") from exc
    if consumer is not None and (consumer.tokens <= 0 or len(consumer.last_key) != 16):
        raise Finding(f"accepted a malformed consumer request {consumer}")
    if consumer is not None and consumer.engine is not None:
        try:  # the decode side compares it with its own fields, in a log line
            engine_differences(consumer.engine, {"model": "m", "extra": {}})
        except Exception as exc:
            raise Finding(f"engine fields break the comparison: {exc!r}") from exc


def http_prefix(data: bytes) -> None:
    """The body of ``POST /v1/prefix`` (the handler turns ``ValueError`` into a 400)."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return
    with own_errors(ValueError):
        tokens, model = parse_query(body)
        if any(type(t) is not int or not 0 <= t < 1 << 32 for t in tokens):
            raise Finding("accepted a token id out of range")


def toml_config(data: bytes) -> None:
    """An agent's ``--config`` file, through the agent's real argument parsing."""
    import argparse  # noqa: PLC0415

    from meshkv.cli import agent_cmd  # noqa: PLC0415

    with tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False) as f:
        f.write(data)
    try:
        parser = argparse.ArgumentParser()
        agent_cmd.add_arguments(parser)
        args = parser.parse_args(["--config", f.name, "--socket", "/tmp/mkv-fuzz.sock"])
        with own_errors():
            agent_cmd.build_config(args)
    finally:
        os.unlink(f.name)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "local_frames": local_frames,
    "peer_frames": peer_frames,
    "gossip": gossip,
    "gossip_raw": gossip_raw,
    "handshake": handshake,
    "record_header": record_header,
    "ssd_file": ssd_file,
    "kv_transfer_params": kv_transfer_params,
    "http_prefix": http_prefix,
    "toml_config": toml_config,
}
