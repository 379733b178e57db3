"""Mutual authentication of two peers over the mesh secret (HMAC-SHA256).

::

    client                                         server
      HELLO {node, min, max, nonce_c}         ->
                                              <-   HELLO {node, version, nonce_s, mac_s}
      check mac_s                                  mac_s = HMAC(secret, "server", transcript)
      AUTH {mac_c}                            ->   mac_c = HMAC(secret, "client", transcript)
                                              <-   AUTH {ok}   (or ERROR {code, message})

``transcript`` binds both nonces, both node ids and the chosen protocol version, so a
MAC cannot be replayed on another connection or reflected back to its sender (the two
directions use different labels). The secret itself never travels. Both sides pick
fresh 32-byte nonces. Anything unexpected (another kind, a payload, a missing field)
fails the handshake; nothing a peer sends before it passes is acted on.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from typing import Any

import msgpack

from meshkv.errors import AuthenticationFailed, NodeIdConflict, ProtocolError, VersionMismatch

from .base import TransportConfig
from .framing import Flags, MsgKind, encode_head, pack_header, unpack_header
from .wire import Wire

logger = logging.getLogger(__name__)

NONCE_BYTES = 32
_MAC_BYTES = hashlib.sha256().digest_size


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """What a successful handshake established."""

    peer_node_id: str
    protocol_version: int


def _mac(secret: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(secret, label + transcript, hashlib.sha256).digest()


def _transcript(
    nonce_c: bytes, nonce_s: bytes, client_id: str, server_id: str, version: int
) -> bytes:
    packed: bytes = msgpack.packb(
        ["meshkv-handshake-v1", nonce_c, nonce_s, client_id, server_id, version]
    )
    return packed


async def _send(wire: Wire, kind: MsgKind, header: dict[str, Any]) -> None:
    raw = pack_header(header)
    await wire.send_frame(encode_head(kind, Flags.NONE, 0, len(raw), 0), raw, None)


async def _send_error(wire: Wire, exc: Exception) -> None:
    """Best effort: tell the peer why before dropping it."""
    code = getattr(exc, "code", "auth")
    try:
        await _send(wire, MsgKind.ERROR, {"code": code, "message": str(exc)})
    except Exception as send_exc:  # the peer may already be gone; the error still stands
        logger.debug("could not send handshake error: %s", send_exc)


async def _recv(wire: Wire, expect: MsgKind) -> dict[str, Any]:
    frame, raw = await wire.recv_head()
    if frame.payload_len:
        raise ProtocolError(f"handshake {frame.kind.name} frame carries a payload")
    header = unpack_header(raw)
    if frame.kind is MsgKind.ERROR:
        code = header.get("code")
        message = str(header.get("message", "peer rejected the handshake"))
        if code == VersionMismatch.code:
            raise VersionMismatch(f"peer: {message}")
        if code == NodeIdConflict.code:
            raise NodeIdConflict(f"the agent at {wire.remote} refused us: {message}")
        raise AuthenticationFailed(f"peer rejected the handshake: {message}")
    if frame.kind is not expect:
        raise AuthenticationFailed(
            f"expected {expect.name} during the handshake, got {frame.kind.name}"
        )
    return header


def _field(header: dict[str, Any], name: str, kind: type, size: int | None = None) -> Any:
    value = header.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AuthenticationFailed(f"handshake field {name!r} missing or not {kind.__name__}")
    if size is not None and isinstance(value, bytes) and len(value) != size:
        raise AuthenticationFailed(f"handshake field {name!r} must be {size} bytes")
    if isinstance(value, str) and not 0 < len(value) <= 256:
        raise AuthenticationFailed(f"handshake field {name!r} must be 1-256 characters")
    return value


async def client_handshake(wire: Wire, config: TransportConfig) -> HandshakeResult:
    """Run the client side; raises ``AuthenticationFailed`` / ``VersionMismatch``.

    The caller bounds it with the connect deadline.
    """
    nonce_c = os.urandom(NONCE_BYTES)
    await _send(
        wire,
        MsgKind.HELLO,
        {
            "node": config.node_id,
            "min": config.min_protocol_version,
            "max": config.max_protocol_version,
            "nonce": nonce_c,
        },
    )
    hello = await _recv(wire, MsgKind.HELLO)
    try:
        server_id: str = _field(hello, "node", str)
        version: int = _field(hello, "version", int)
        nonce_s: bytes = _field(hello, "nonce", bytes, NONCE_BYTES)
        mac_s: bytes = _field(hello, "mac", bytes, _MAC_BYTES)
        if server_id == config.node_id:
            raise NodeIdConflict(
                f"the agent at {wire.remote} has node id {server_id!r}, the same as this "
                "agent's: every agent needs its own --node-id"
            )
        if not config.min_protocol_version <= version <= config.max_protocol_version:
            raise VersionMismatch(
                f"server chose protocol version {version}, we speak "
                f"{config.min_protocol_version}..{config.max_protocol_version}"
            )
        transcript = _transcript(nonce_c, nonce_s, config.node_id, server_id, version)
        if not hmac.compare_digest(mac_s, _mac(config.secret, b"server", transcript)):
            raise AuthenticationFailed(
                f"server {server_id!r} failed to prove the mesh secret (wrong secret?)"
            )
    except (AuthenticationFailed, VersionMismatch) as exc:
        await _send_error(wire, exc)
        raise
    await _send(wire, MsgKind.AUTH, {"mac": _mac(config.secret, b"client", transcript)})
    await _recv(wire, MsgKind.AUTH)
    return HandshakeResult(server_id, version)


async def server_handshake(wire: Wire, config: TransportConfig) -> HandshakeResult:
    """Run the server side; raises ``AuthenticationFailed`` / ``VersionMismatch``."""
    hello = await _recv(wire, MsgKind.HELLO)
    try:
        client_id: str = _field(hello, "node", str)
        their_min: int = _field(hello, "min", int)
        their_max: int = _field(hello, "max", int)
        nonce_c: bytes = _field(hello, "nonce", bytes, NONCE_BYTES)
        if client_id == config.node_id:
            raise NodeIdConflict(
                f"the agent at {wire.remote} uses node id {client_id!r}, which is already "
                "this agent's: every agent needs its own --node-id"
            )
        version = min(their_max, config.max_protocol_version)
        if version < max(their_min, config.min_protocol_version):
            raise VersionMismatch(
                f"no common protocol version: peer speaks {their_min}..{their_max}, we speak "
                f"{config.min_protocol_version}..{config.max_protocol_version}"
            )
    except (AuthenticationFailed, VersionMismatch) as exc:
        await _send_error(wire, exc)
        raise
    nonce_s = os.urandom(NONCE_BYTES)
    transcript = _transcript(nonce_c, nonce_s, client_id, config.node_id, version)
    await _send(
        wire,
        MsgKind.HELLO,
        {
            "node": config.node_id,
            "min": config.min_protocol_version,
            "max": config.max_protocol_version,
            "version": version,
            "nonce": nonce_s,
            "mac": _mac(config.secret, b"server", transcript),
        },
    )
    auth = await _recv(wire, MsgKind.AUTH)
    try:
        mac_c: bytes = _field(auth, "mac", bytes, _MAC_BYTES)
        if not hmac.compare_digest(mac_c, _mac(config.secret, b"client", transcript)):
            raise AuthenticationFailed(
                f"client {client_id!r} failed to prove the mesh secret (wrong secret?)"
            )
    except AuthenticationFailed as exc:
        await _send_error(wire, exc)
        raise
    await _send(wire, MsgKind.AUTH, {"ok": True})
    return HandshakeResult(client_id, version)
