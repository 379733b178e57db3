"""meshkv's peer transport: one narrow interface, TCP, UCX and in-memory implementations.

``base.py`` documents the interface the mesh uses; ``framing.py`` the wire format;
``handshake.py`` peer authentication. UCX is imported lazily (``meshkv[ucx]``).
"""

from .base import (
    Alloc,
    Buffer,
    Connection,
    ConnectionPool,
    Handler,
    Listener,
    Message,
    PeerInfo,
    RecvInto,
    Transport,
    TransportConfig,
    TransportStats,
    format_address,
    parse_address,
)
from .framing import MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION, Flags, MsgKind
from .memory import Faults, MemoryNetwork, MemoryTransport
from .tcp import TcpOptions, TcpTransport

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_PAYLOAD_BYTES",
    "PROTOCOL_VERSION",
    "Alloc",
    "Buffer",
    "Connection",
    "ConnectionPool",
    "Faults",
    "Flags",
    "Handler",
    "Listener",
    "MemoryNetwork",
    "MemoryTransport",
    "Message",
    "MsgKind",
    "PeerInfo",
    "RecvInto",
    "TcpOptions",
    "TcpTransport",
    "Transport",
    "TransportConfig",
    "TransportStats",
    "format_address",
    "parse_address",
]
