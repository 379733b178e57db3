"""Messages of the mesh's sans-IO cores (membership and directory) and their wire form.

Every message is a frozen dataclass. ``to_wire()`` returns a msgpack-able list whose first
element is the message's ``Kind`` (an append-only enum: never renumber, only add);
``decode(obj)`` turns such a list back into a message and raises ``ProtocolError`` with a
clear reason for anything malformed. The cores exchange ``Outgoing`` records: the shell
sends ``msg`` to the address ``to``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self, TypeAlias

from meshkv.errors import ProtocolError

MAX_UPDATES = 4096
"""Most member records accepted in one message (a push-pull of a 4,096-node mesh)."""
MAX_KEYS = 65536
"""Most chunk keys accepted in one directory message."""
KEY_LEN = 16


class Kind(enum.IntEnum):
    """Message kinds on the wire. Append-only."""

    PING = 1
    ACK = 2
    PING_REQ = 3
    NACK = 4
    GOSSIP = 5
    PUSH_PULL = 6
    ANNOUNCE = 20
    HANDOFF = 21
    LOOKUP = 22
    LOOKUP_REPLY = 23


class State(enum.IntEnum):
    """A member's state. At equal incarnation a higher value overrides a lower one."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class Update:
    """One gossiped fact: ``node`` (at ``addr``) is in ``state`` at ``incarnation``.

    ``origin`` is the member that declared a suspicion or death (Lifeguard counts
    independent origins as confirmations); for ALIVE and LEFT it is the node itself.
    """

    node: str
    addr: str
    incarnation: int
    state: State
    origin: str

    def to_wire(self) -> list[Any]:
        return [self.node, self.addr, self.incarnation, int(self.state), self.origin]

    @classmethod
    def from_wire(cls, obj: Any) -> Update:
        if not isinstance(obj, list | tuple) or len(obj) != 5:
            raise ProtocolError(f"member update must be a 5-element list, got {obj!r:.80}")
        node, addr, inc, state, origin = obj
        _need_str(node, "update.node")
        _need_str(addr, "update.addr")
        _need_str(origin, "update.origin")
        _need_int(inc, "update.incarnation")
        try:
            st = State(state)
        except ValueError:
            raise ProtocolError(f"unknown member state {state!r}") from None
        return cls(node, addr, inc, st, origin)


class _Wire:
    """Mixin giving every message ``from_wire`` (the inverse of its ``to_wire``)."""

    __slots__ = ()

    @classmethod
    def from_wire(cls, obj: Any) -> Self:
        msg = decode(obj)
        if not isinstance(msg, cls):
            raise ProtocolError(f"expected {cls.__name__}, got {type(msg).__name__}")
        return msg


Updates: TypeAlias = tuple[Update, ...]


@dataclass(frozen=True, slots=True)
class Ping(_Wire):
    """Direct probe of ``target`` by ``sender``; answered with an ``Ack`` of the same seq."""

    seq: int
    sender: str
    target: str
    updates: Updates = ()

    def to_wire(self) -> list[Any]:
        return [Kind.PING, self.seq, self.sender, self.target, _updates_out(self.updates)]


@dataclass(frozen=True, slots=True)
class Ack(_Wire):
    """Answer to a ``Ping`` (or relayed answer of an indirect probe)."""

    seq: int
    sender: str
    updates: Updates = ()

    def to_wire(self) -> list[Any]:
        return [Kind.ACK, self.seq, self.sender, _updates_out(self.updates)]


@dataclass(frozen=True, slots=True)
class PingReq(_Wire):
    """Ask ``sender``'s peer to probe ``target`` at ``target_addr`` on ``sender``'s behalf."""

    seq: int
    sender: str
    target: str
    target_addr: str
    updates: Updates = ()

    def to_wire(self) -> list[Any]:
        return [
            Kind.PING_REQ,
            self.seq,
            self.sender,
            self.target,
            self.target_addr,
            _updates_out(self.updates),
        ]


@dataclass(frozen=True, slots=True)
class Nack(_Wire):
    """Relay could not reach the target in time (Lifeguard: proves the relay path works)."""

    seq: int
    sender: str

    def to_wire(self) -> list[Any]:
        return [Kind.NACK, self.seq, self.sender]


@dataclass(frozen=True, slots=True)
class Gossip(_Wire):
    """Queued updates fanned out every gossip interval."""

    sender: str
    updates: Updates

    def to_wire(self) -> list[Any]:
        return [Kind.GOSSIP, self.sender, _updates_out(self.updates)]


@dataclass(frozen=True, slots=True)
class PushPull(_Wire):
    """Full member state for anti-entropy; ``reply`` is False on the request (which the
    receiver answers with its own state) and True on the answer."""

    sender: str
    states: Updates
    reply: bool = False
    join: bool = False

    def to_wire(self) -> list[Any]:
        return [Kind.PUSH_PULL, self.sender, _updates_out(self.states), self.reply, self.join]


@dataclass(frozen=True, slots=True)
class Announce(_Wire):
    """Holder ``sender`` now holds ``adds`` and no longer holds ``drops`` (keys it is home of
    at the receiver)."""

    sender: str
    adds: tuple[bytes, ...] = ()
    drops: tuple[bytes, ...] = ()

    def to_wire(self) -> list[Any]:
        return [Kind.ANNOUNCE, self.sender, list(self.adds), list(self.drops)]


@dataclass(frozen=True, slots=True)
class Handoff(_Wire):
    """Entries whose home moved to the receiver: ``(key, holders)`` pairs."""

    sender: str
    entries: tuple[tuple[bytes, tuple[str, ...]], ...]

    def to_wire(self) -> list[Any]:
        return [Kind.HANDOFF, self.sender, [[k, list(h)] for k, h in self.entries]]


@dataclass(frozen=True, slots=True)
class Lookup(_Wire):
    """Ask a home for the holders of ``keys``; answered with ``LookupReply`` of the same seq."""

    seq: int
    sender: str
    keys: tuple[bytes, ...]

    def to_wire(self) -> list[Any]:
        return [Kind.LOOKUP, self.seq, self.sender, list(self.keys)]


@dataclass(frozen=True, slots=True)
class LookupReply(_Wire):
    """Holders of each key of the ``Lookup`` with this seq, in the same order."""

    seq: int
    sender: str
    holders: tuple[tuple[str, ...], ...]

    def to_wire(self) -> list[Any]:
        return [Kind.LOOKUP_REPLY, self.seq, self.sender, [list(h) for h in self.holders]]


Message: TypeAlias = (
    Ping | Ack | PingReq | Nack | Gossip | PushPull | Announce | Handoff | Lookup | LookupReply
)
MembershipMessage: TypeAlias = Ping | Ack | PingReq | Nack | Gossip | PushPull
DirectoryMessage: TypeAlias = Announce | Handoff | Lookup | LookupReply


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message a core wants sent: the shell delivers ``msg`` to address ``to``."""

    to: str
    msg: Message


# -- decoding ---------------------------------------------------------------------------


def decode(obj: Any) -> Message:
    """Turn a ``to_wire()`` list (after a msgpack round trip) back into a message."""
    if not isinstance(obj, list | tuple) or not obj:
        raise ProtocolError(f"mesh message must be a non-empty list, got {type(obj).__name__}")
    try:
        kind = Kind(obj[0])
    except ValueError:
        raise ProtocolError(f"unknown mesh message kind {obj[0]!r}") from None
    fields = obj[1:]
    spec = _DECODERS[kind]
    if len(fields) != spec[0]:
        raise ProtocolError(f"{kind.name} needs {spec[0]} fields, got {len(fields)}")
    return spec[1](list(fields))


def _need_str(v: Any, what: str) -> None:
    if not isinstance(v, str):
        raise ProtocolError(f"{what} must be a string, got {type(v).__name__}")


def _need_int(v: Any, what: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 1 << 63:
        raise ProtocolError(f"{what} must be a non-negative 64-bit integer, got {v!r:.40}")


def _updates_out(updates: Updates) -> list[list[Any]]:
    return [u.to_wire() for u in updates]


def _updates_in(obj: Any) -> Updates:
    if not isinstance(obj, list | tuple):
        raise ProtocolError("member updates must be a list")
    if len(obj) > MAX_UPDATES:
        raise ProtocolError(f"too many member updates ({len(obj)} > {MAX_UPDATES})")
    return tuple(Update.from_wire(u) for u in obj)


def _keys_in(obj: Any, what: str) -> tuple[bytes, ...]:
    if not isinstance(obj, list | tuple):
        raise ProtocolError(f"{what} must be a list of keys")
    if len(obj) > MAX_KEYS:
        raise ProtocolError(f"too many keys in {what} ({len(obj)} > {MAX_KEYS})")
    for k in obj:
        if not isinstance(k, bytes) or len(k) != KEY_LEN:
            raise ProtocolError(f"{what}: chunk keys must be {KEY_LEN} bytes")
    return tuple(obj)


def _names_in(obj: Any, what: str) -> tuple[str, ...]:
    if not isinstance(obj, list | tuple) or len(obj) > MAX_UPDATES:
        raise ProtocolError(f"{what} must be a list of at most {MAX_UPDATES} node ids")
    for n in obj:
        _need_str(n, what)
    return tuple(obj)


def _ping(f: list[Any]) -> Message:
    _need_int(f[0], "seq")
    _need_str(f[1], "sender")
    _need_str(f[2], "target")
    return Ping(f[0], f[1], f[2], _updates_in(f[3]))


def _ack(f: list[Any]) -> Message:
    _need_int(f[0], "seq")
    _need_str(f[1], "sender")
    return Ack(f[0], f[1], _updates_in(f[2]))


def _ping_req(f: list[Any]) -> Message:
    _need_int(f[0], "seq")
    for i in (1, 2, 3):
        _need_str(f[i], "ping_req field")
    return PingReq(f[0], f[1], f[2], f[3], _updates_in(f[4]))


def _nack(f: list[Any]) -> Message:
    _need_int(f[0], "seq")
    _need_str(f[1], "sender")
    return Nack(f[0], f[1])


def _gossip(f: list[Any]) -> Message:
    _need_str(f[0], "sender")
    return Gossip(f[0], _updates_in(f[1]))


def _push_pull(f: list[Any]) -> Message:
    _need_str(f[0], "sender")
    if not isinstance(f[2], bool) or not isinstance(f[3], bool):
        raise ProtocolError("push_pull flags must be booleans")
    return PushPull(f[0], _updates_in(f[1]), f[2], f[3])


def _announce(f: list[Any]) -> Message:
    _need_str(f[0], "sender")
    return Announce(f[0], _keys_in(f[1], "announce.adds"), _keys_in(f[2], "announce.drops"))


def _handoff(f: list[Any]) -> Message:
    _need_str(f[0], "sender")
    if not isinstance(f[1], list | tuple) or len(f[1]) > MAX_KEYS:
        raise ProtocolError("handoff entries must be a list")
    entries = []
    for e in f[1]:
        if not isinstance(e, list | tuple) or len(e) != 2:
            raise ProtocolError("handoff entry must be [key, holders]")
        (key,) = _keys_in([e[0]], "handoff key")
        entries.append((key, _names_in(e[1], "handoff holders")))
    return Handoff(f[0], tuple(entries))


def _lookup(f: list[Any]) -> Message:
    _need_int(f[0], "seq")
    _need_str(f[1], "sender")
    return Lookup(f[0], f[1], _keys_in(f[2], "lookup.keys"))


def _lookup_reply(f: list[Any]) -> Message:
    _need_int(f[0], "seq")
    _need_str(f[1], "sender")
    if not isinstance(f[2], list | tuple) or len(f[2]) > MAX_KEYS:
        raise ProtocolError("lookup_reply holders must be a list")
    return LookupReply(f[0], f[1], tuple(_names_in(h, "lookup_reply holders") for h in f[2]))


_DECODERS: dict[Kind, tuple[int, Callable[[list[Any]], Message]]] = {
    Kind.PING: (4, _ping),
    Kind.ACK: (3, _ack),
    Kind.PING_REQ: (5, _ping_req),
    Kind.NACK: (2, _nack),
    Kind.GOSSIP: (2, _gossip),
    Kind.PUSH_PULL: (4, _push_pull),
    Kind.ANNOUNCE: (3, _announce),
    Kind.HANDOFF: (2, _handoff),
    Kind.LOOKUP: (3, _lookup),
    Kind.LOOKUP_REPLY: (3, _lookup_reply),
}
