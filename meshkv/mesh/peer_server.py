"""Peer-channel request handlers: chunk get/push, directory, membership, transfers.

Thin, like every server: decode and validate a frame's header, hand it to the node through
its ``PeerDelegate`` seam (or serve a chunk from the store, made resident first by the
node's puller through ``Residency``), encode the answer. Only authenticated peers reach
this code (the transport runs the HMAC handshake before it hands anything to a handler).
Anything malformed raises ``ProtocolError`` with a reason; the transport answers it with
an ERROR frame (or drops the connection) and the agent keeps serving.

Frames (``meshkv.transport.framing.MsgKind``; header fields are msgpack):

====================  =======================================  ============================
kind                  header                                   answer
====================  =======================================  ============================
PING, ACK, PING_REQ,  ``{"m": <membership message wire form>,   none (one-way)
GOSSIP, PUSH_PULL     "src": sender's peer address}``
DIR_ANNOUNCE          ``{"m": <Announce or Handoff>}``            none (one-way)
DIR_LOOKUP            ``{"m": <Lookup>}``                         DIR_REPLY ``{"m": <LookupReply>}``
CHUNK_GET             ``{"ns": 16 B, "key": 16 B,                  CHUNK_DATA ``{"found": bool,
                      "wait": s (v2, optional)}``                 "record": RecordHeader}`` +
                                                                 payload
CHUNK_PUSH            ``{"push": int, "record": RecordHeader}``   ACK ``{"stored": bool}``
                      + payload
NODE_STATS            ``{}``                                      NODE_STATS ``{"chunks",
                                                                 "bytes", "tiers",
                                                                 "hit_rate"}``
TRANSFER_DONE (v2)    ``{"id": transfer id}``                     none (one-way)
TRANSFER_RENEW (v3)   ``{"ids": [transfer id], "s": seconds}``    none (one-way)
====================  =======================================  ============================

A ``CHUNK_GET`` with ``wait`` > 0 may wait (at most that long, at most ``MAX_GET_WAIT_S``)
for a chunk this node's engine is still committing: the decode side of a prefill/decode
transfer often asks before the prefill engine's commit has landed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshkv.chunk import KEY_BYTES, ChunkKey, NamespaceId, RecordHeader
from meshkv.errors import ChecksumMismatch, MeshKVError, NamespaceMismatch, ProtocolError
from meshkv.mesh import messages as mm
from meshkv.mesh.seams import PeerDelegate, Residency
from meshkv.store import Store
from meshkv.transport.base import Message, PeerInfo
from meshkv.transport.framing import MsgKind

logger = logging.getLogger(__name__)

SERVE_OWNER = (1 << 62) + 2
"""Store owner of the pins held while a chunk is sent to a peer."""
PUSH_OWNER = (1 << 62) + 3
"""Store owner of the slots reserved for chunks pushed by peers."""
SERVE_LEASE_S = 30.0
"""Longest a pin may be held for a send (the transport releases it when the send ends)."""
MAX_GET_WAIT_S = 2.0
"""Longest a ``CHUNK_GET`` waits for a commit in progress here."""
MISS_LOG_INTERVAL_S = 1.0
"""A chunk asked for and not here is logged at most once per this many seconds."""
MAX_PENDING_PUSHES = 256
"""Most pushed payloads being received at once; more land in the scratch sink and are
dropped (the pusher sees ``stored: false``)."""

MEMBERSHIP_MESSAGES = (mm.Ping, mm.Ack, mm.PingReq, mm.Nack, mm.Gossip, mm.PushPull)
MEMBERSHIP_KINDS = frozenset(
    {MsgKind.PING, MsgKind.ACK, MsgKind.PING_REQ, MsgKind.GOSSIP, MsgKind.PUSH_PULL}
)


@dataclass(slots=True)
class PeerServerStats:
    """Counters of the peer channel's handlers."""

    chunks_served: int = 0
    bytes_served: int = 0
    chunk_misses: int = 0
    """CHUNK_GET of a key this node no longer holds (the requester corrects the home)."""
    pushes_stored: int = 0
    pushes_rejected: int = 0
    """Pushed chunks that failed verification."""
    bad_messages: int = 0
    """Headers that failed validation (answered with an ERROR frame)."""


class PeerServer:
    """Serves one agent's peer port."""

    def __init__(self, node: PeerDelegate, store: Store, residency: Residency) -> None:
        self._node = node
        self._store = store
        self._residency = residency
        self._pushes: dict[tuple[str, int], tuple[RecordHeader, float]] = {}
        self._sink = bytearray()
        """Where pushed payloads that will be dropped land: one buffer shared by all of
        them (nobody reads it), so a peer cannot make this node allocate per frame."""
        self._miss_logged = -float("inf")
        self.stats = PeerServerStats()

    async def handle(self, peer: PeerInfo, msg: Message) -> Message | None:
        try:
            return await self._dispatch(peer, msg)
        except ProtocolError:
            self.stats.bad_messages += 1
            logger.info("bad %s message from %s", msg.kind.name, peer.node_id)
            raise

    async def _dispatch(self, peer: PeerInfo, msg: Message) -> Message | None:
        kind = msg.kind
        if kind in MEMBERSHIP_KINDS:
            core_msg = _core_message(msg.header)
            if not isinstance(core_msg, MEMBERSHIP_MESSAGES):
                raise ProtocolError(f"{kind.name} frame carries a {type(core_msg).__name__}")
            src = msg.header.get("src")
            if not isinstance(src, str) or not src:
                raise ProtocolError("membership frame lacks the sender's address 'src'")
            self._node.on_membership(peer.node_id, src, core_msg)
            return None
        if kind == MsgKind.DIR_ANNOUNCE:
            core_msg = _core_message(msg.header)
            if not isinstance(core_msg, mm.Announce | mm.Handoff):
                raise ProtocolError(f"DIR_ANNOUNCE carries a {type(core_msg).__name__}")
            _check_sender(core_msg.sender, peer)
            src = msg.header.get("src")
            self._node.on_directory(src if isinstance(src, str) else peer.address, core_msg)
            return None
        if kind == MsgKind.DIR_LOOKUP:
            core_msg = _core_message(msg.header)
            if not isinstance(core_msg, mm.Lookup):
                raise ProtocolError(f"DIR_LOOKUP carries a {type(core_msg).__name__}")
            holders = self._node.holders_here(core_msg.keys)
            reply = mm.LookupReply(core_msg.seq, self._node.node_id, holders)
            return Message(MsgKind.DIR_REPLY, {"m": reply.to_wire()})
        if kind == MsgKind.CHUNK_GET:
            return await self._chunk_get(msg.header)
        if kind == MsgKind.CHUNK_PUSH:
            return self._chunk_push(peer, msg)
        if kind == MsgKind.NODE_STATS:
            return Message(MsgKind.NODE_STATS, self._node.own_stats())
        if kind == MsgKind.TRANSFER_DONE:
            transfer_id = msg.header.get("id")
            if not isinstance(transfer_id, str) or not 0 < len(transfer_id) <= 128:
                raise ProtocolError("TRANSFER_DONE needs 'id', a string of 1..128 characters")
            self._node.transfer_done(peer.node_id, transfer_id)
            return None
        if kind == MsgKind.TRANSFER_RENEW:
            ids, seconds = _renewal(msg.header)
            self._node.transfer_renew(peer.node_id, ids, seconds)
            return None
        raise ProtocolError(f"peer message kind {kind.name} is not served here")

    # --- chunks -----------------------------------------------------------------------

    async def _chunk_get(self, header: Mapping[str, Any]) -> Message:
        ns = NamespaceId(_bytes16(header, "ns"))
        key = ChunkKey(_bytes16(header, "key"))
        wait = header.get("wait", 0.0)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not wait >= 0:
            raise ProtocolError(f"CHUNK_GET 'wait' must be a number of seconds >= 0, got {wait!r}")
        store = self._store
        writing = store.being_written(key)
        started = self._node.now()
        await self._residency.resident(ns, [key], min(float(wait), MAX_GET_WAIT_S), peers=False)
        (pin,) = await store.read(ns, [key], SERVE_OWNER, SERVE_LEASE_S)
        if pin is None:
            self.stats.chunk_misses += 1
            now = self._node.now()
            if now - self._miss_logged >= MISS_LOG_INTERVAL_S:  # a stale directory: many
                self._miss_logged = now
                logger.info(
                    "asked for chunk %s, not here (%s; answered after %.3f s; %d misses so far)",
                    key.hex(), "its commit did not come in time" if writing
                    else "not being written", now - started, self.stats.chunk_misses,
                )  # fmt: skip
            if store.describe(key) is None:  # not here in any namespace: correct the home
                self._node.not_held(key)
            return Message(MsgKind.CHUNK_DATA, {"found": False})
        checksum = await store.checksum_for(pin)  # hashed now if deferred (store.hash)
        record = RecordHeader(ns, key, pin.num_tokens, pin.slot.length, checksum)
        lease = pin.lease_id

        def release() -> None:
            try:
                store.release([lease], SERVE_OWNER)
            except MeshKVError as exc:  # reclaimed after its deadline: counted by the store
                logger.debug("release of a served pin: %s", exc)

        self.stats.chunks_served += 1
        self.stats.bytes_served += pin.slot.length
        return Message(
            MsgKind.CHUNK_DATA,
            {"found": True, "record": record.pack()},
            payload=store.payload(pin.slot),
            on_sent=release,
        )

    def alloc(
        self, peer: PeerInfo, kind: MsgKind, header: Mapping[str, Any], length: int
    ) -> memoryview | None:
        """Where a pushed payload lands: a slot reserved in the store when one is free,
        else the shared sink (dropped). Only ``CHUNK_PUSH`` carries a payload: any other
        request with one is refused (its bytes are skipped, never buffered)."""
        if kind != MsgKind.CHUNK_PUSH:
            self.stats.bad_messages += 1
            raise ProtocolError(f"{kind.name} requests carry no payload ({length} bytes sent)")
        if len(self._pushes) >= MAX_PENDING_PUSHES:
            return self._drop_into(length)
        try:
            push_id = _push_id(header)
            record = RecordHeader.unpack(_field(header, "record", bytes))
        except (ProtocolError, ChecksumMismatch):
            return self._drop_into(length)  # the handler reports the error
        if record.payload_len != length or (peer.node_id, push_id) in self._pushes:
            return self._drop_into(length)
        try:
            slot = self._store.reserve(record.namespace, record.key, length, PUSH_OWNER)
        except MeshKVError as exc:
            logger.debug("no slot for a pushed chunk: %s", exc)
            return self._drop_into(length)
        if slot is None:
            return self._drop_into(length)
        self._pushes[(peer.node_id, push_id)] = (record, self._node.now())
        return self._store.payload(slot)

    def _drop_into(self, length: int) -> memoryview:
        """The sink, grown to ``length`` (at most the transport's payload limit, the
        largest chunk)."""
        if len(self._sink) < length:
            self._sink = bytearray(length)
        return memoryview(self._sink)[:length]

    def _chunk_push(self, peer: PeerInfo, msg: Message) -> Message:
        push_id = _push_id(msg.header)
        pending = self._pushes.pop((peer.node_id, push_id), None)
        if pending is None:
            try:
                RecordHeader.unpack(_field(msg.header, "record", bytes))
            except ChecksumMismatch as exc:
                raise ProtocolError(f"CHUNK_PUSH record header: {exc}") from exc
            return Message(MsgKind.ACK, {"stored": False})
        reserved = pending[0]
        store = self._store
        try:
            reserved.verify(msg.payload if msg.payload is not None else b"")
        except (ChecksumMismatch, NamespaceMismatch) as exc:
            self.stats.pushes_rejected += 1
            self._node.count_checksum_failure()
            store.abort(reserved.namespace, reserved.key, PUSH_OWNER)
            logger.warning(
                "pushed chunk %s from %s rejected: %s", reserved.key.hex(), peer.node_id, exc
            )
            return Message(MsgKind.ACK, {"stored": False})
        store.commit(
            reserved.namespace, reserved.key, PUSH_OWNER, reserved.num_tokens, reserved.checksum,
            wanted=True,
        )  # fmt: skip
        self.stats.pushes_stored += 1
        return Message(MsgKind.ACK, {"stored": True})

    def sweep(self, older_than: float) -> None:
        """Abort reservations of pushes whose payload never reached the handler (the
        connection died mid-frame) and that were reserved before ``older_than``."""
        for ident, (record, reserved_at) in list(self._pushes.items()):
            if reserved_at < older_than:
                del self._pushes[ident]
                self._abort(record)

    def abort_all(self) -> None:
        for record, _ in self._pushes.values():
            self._abort(record)
        self._pushes.clear()

    def _abort(self, record: RecordHeader) -> None:
        try:
            self._store.abort(record.namespace, record.key, PUSH_OWNER)
        except MeshKVError as exc:
            logger.debug("abort of a pending push: %s", exc)


def _core_message(header: Mapping[str, Any]) -> mm.Message:
    if "m" not in header:
        raise ProtocolError("mesh frame header lacks its message field 'm'")
    return mm.decode(header["m"])


def _check_sender(sender: str, peer: PeerInfo) -> None:
    if sender != peer.node_id:
        raise ProtocolError(
            f"message claims sender {sender!r} but the connection authenticated {peer.node_id!r}"
        )


def _field(header: Mapping[str, Any], name: str, typ: type[Any]) -> Any:
    value = header.get(name)
    if not isinstance(value, typ):
        raise ProtocolError(f"header field {name!r} must be {typ.__name__}, got {value!r:.40}")
    return value


def _bytes16(header: Mapping[str, Any], name: str) -> bytes:
    value: bytes = _field(header, name, bytes)
    if len(value) != KEY_BYTES:
        raise ProtocolError(f"header field {name!r} must be {KEY_BYTES} bytes, got {len(value)}")
    return value


def _push_id(header: Mapping[str, Any]) -> int:
    value: int = _field(header, "push", int)
    if isinstance(value, bool) or not 0 <= value < 1 << 63:
        raise ProtocolError("header field 'push' must be a non-negative 63-bit integer")
    return value


MAX_RENEW_IDS = 1024
"""Most transfers one ``TRANSFER_RENEW`` may name."""
MAX_RENEW_S = 600.0
"""Longest extension one ``TRANSFER_RENEW`` may ask for (the holder caps it further)."""


def _renewal(header: Mapping[str, Any]) -> tuple[list[str], float]:
    ids, seconds = header.get("ids"), header.get("s")
    if not isinstance(ids, list) or not 0 < len(ids) <= MAX_RENEW_IDS:
        raise ProtocolError(f"TRANSFER_RENEW needs 'ids', a list of 1..{MAX_RENEW_IDS} ids")
    for value in ids:
        if not isinstance(value, str) or not 0 < len(value) <= 128:
            raise ProtocolError("TRANSFER_RENEW: each id must be a string of 1..128 characters")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ProtocolError(f"TRANSFER_RENEW needs 's', a number of seconds, got {seconds!r}")
    if not 0 < seconds <= MAX_RENEW_S:
        raise ProtocolError(f"TRANSFER_RENEW 's' must be in (0, {MAX_RENEW_S:g}], got {seconds!r}")
    return ids, float(seconds)
