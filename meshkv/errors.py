"""Every exception meshkv raises, in one tree.

    MeshKVError
    ├── ConfigError              bad flag, config file or connector setting
    ├── ProtocolError            malformed, truncated or oversized frame; unknown op
    │   └── VersionMismatch      peers speak protocol versions with no overlap
    ├── ChunkError
    │   ├── ChecksumMismatch     payload or record header failed its xxh3 check
    │   └── NamespaceMismatch    a key was presented under another namespace
    ├── StoreError
    │   ├── NoSpace              no free or evictable slot (e.g. every slot pinned)
    │   ├── NotReserved          commit/abort of a key that holds no reservation
    │   ├── NotPinned            release of a lease that does not exist (double release)
    │   └── TierDegraded         the SSD tier stopped accepting writes (ENOSPC, I/O error)
    ├── DeadlineExceeded         a wait ran past its deadline (also a TimeoutError)
    ├── AgentUnavailable         the local agent cannot be reached
    ├── RemoteError              the agent answered with an error code
    └── TransportError           socket / UCX failure, translated at the transport boundary
        ├── ConnectionClosed
        └── AuthenticationFailed wrong mesh secret or failed handshake
            └── NodeIdConflict   the peer has this agent's own node id

Each class carries a stable ``code`` string used on the wire, so an error raised in the
agent is re-raised as the same class in the client (see ``error_from_code``).
"""

from __future__ import annotations


class MeshKVError(Exception):
    """Base of every meshkv error."""

    code = "internal"


class ConfigError(MeshKVError, ValueError):
    code = "config"


class ProtocolError(MeshKVError):
    code = "protocol"


class VersionMismatch(ProtocolError):
    code = "version"


class ChunkError(MeshKVError):
    code = "chunk"


class ChecksumMismatch(ChunkError):
    code = "checksum"


class NamespaceMismatch(ChunkError):
    code = "namespace"


class StoreError(MeshKVError):
    code = "store"


class NoSpace(StoreError):
    code = "no_space"


class NotReserved(StoreError):
    code = "not_reserved"


class NotPinned(StoreError):
    code = "not_pinned"


class TierDegraded(StoreError):
    code = "tier_degraded"


class DeadlineExceeded(MeshKVError, TimeoutError):
    code = "deadline"


class AgentUnavailable(MeshKVError, ConnectionError):
    code = "unavailable"


class RemoteError(MeshKVError):
    code = "remote"


class TransportError(MeshKVError, ConnectionError):
    code = "transport"


class ConnectionClosed(TransportError):
    code = "closed"


class AuthenticationFailed(TransportError):
    code = "auth"


class NodeIdConflict(AuthenticationFailed):
    """Two agents claim one node id: their handshake is refused on both sides."""

    code = "node_id_conflict"


_BY_CODE: dict[str, type[MeshKVError]] = {}


def _register(cls: type[MeshKVError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(MeshKVError)


def error_from_code(code: str, message: str) -> MeshKVError:
    """Rebuild the error an agent reported; unknown codes become ``RemoteError``."""
    cls = _BY_CODE.get(code, RemoteError)
    return cls(message)
