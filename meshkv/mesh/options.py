"""The mesh shell's settings: ``MeshNodeConfig`` and its presets.

The agent's flags and ``[mesh]`` TOML table become one ``MeshNodeConfig`` in
``meshkv/mesh/cli.py``. Every bad value is a ``ConfigError`` that names the setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from meshkv.errors import ConfigError
from meshkv.mesh.config import DirectoryConfig, MembershipConfig, RingConfig
from meshkv.mesh.tls import TlsFiles
from meshkv.paths import check_private_file
from meshkv.transport.base import parse_address

MIN_SECRET_BYTES = 16
"""Shortest mesh secret accepted (the transport's HMAC handshake needs at least this)."""
PRESETS = ("lan", "local")
TRANSPORTS = ("tcp", "ucx")
WILDCARD_HOSTS = ("0.0.0.0", "::")
"""Hosts that mean "every interface" (the only ones a UCX listener can honour)."""


@dataclass(slots=True)
class MeshNodeConfig:
    """Everything the mesh shell needs besides the store and the node id."""

    listen: str
    """host:port of the peer port (port 0 picks a free one)."""
    secret: bytes = field(repr=False)
    """Mesh secret shared by every agent (at least 16 bytes; never logged)."""
    join: tuple[str, ...] = ()
    """Seed addresses (host:port of other agents' peer ports) contacted at start."""
    advertise: str | None = None
    """Address announced to peers; defaults to the listen address with the real port."""
    transport: str = "tcp"
    """Peer transport: ``tcp`` or ``ucx``."""
    tls: TlsFiles | None = None
    """Mutual TLS on peer TCP connections (certificate, key, CA); None: plain TCP."""
    replicas: int = 1
    """Copies of each locally committed chunk in the mesh (this node + R-1 ring successors)."""
    preset: str = "lan"
    """``lan`` (datacenter timings) or ``local`` (loopback tests, ~5x faster)."""
    membership: MembershipConfig = field(default_factory=MembershipConfig.LAN)
    """SWIM/Lifeguard timings (from the preset)."""
    ring: RingConfig = field(default_factory=RingConfig)
    """Consistent-hash ring settings; identical on every node."""
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    """Directory batching, re-announce and limits."""
    tick_interval_s: float = 0.05
    """Period of the timer that drives the sans-IO cores."""
    connect_timeout_s: float = 1.0
    """Deadline of opening (and authenticating) a peer connection."""
    send_timeout_s: float = 1.0
    """Deadline of one control message (gossip, announcement)."""
    lookup_timeout_s: float = 0.25
    """Deadline of asking the homes of a lookup's keys for their holders."""
    pull_timeout_s: float = 5.0
    """Deadline of one pull, over every holder tried."""
    holder_timeout_s: float = 2.0
    """Deadline of one pull attempt from one holder before the next is tried."""
    repair_chunks_per_s: float = 200.0
    """How fast lost copies are re-made after a member dies or leaves (chunks/s queued)."""
    max_concurrent_pulls: int = 8
    """Pulls running at once (more wait their turn, under their deadline)."""
    connections_per_peer: int = 4
    """Data connections per peer (pulls and pushes do not queue behind each other)."""
    control_queue_limit: int = 1024
    """Control messages queued per peer; beyond it the oldest is dropped (gossip tolerates
    loss; announcements are repaired by re-announce)."""

    def __post_init__(self) -> None:
        parse_address(self.listen)
        for seed in self.join:
            parse_address(seed)
        if self.advertise is not None:
            _, port = parse_address(self.advertise)
            if port == 0:
                raise ConfigError("--advertise needs a real port")
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"mesh secret must be at least {MIN_SECRET_BYTES} bytes")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"--transport must be one of {TRANSPORTS}, got {self.transport!r}")
        host, port = parse_address(self.listen)
        if self.transport == "ucx" and host not in WILDCARD_HOSTS:
            # ucxx's listener takes a port only and binds every interface: listening "on"
            # one host would be a promise the node cannot keep.
            raise ConfigError(
                f"--transport ucx cannot listen on {host} only: UCX listeners accept on every "
                f"interface (ucxx takes no bind address). Pass --listen 0.0.0.0:PORT "
                f"--advertise {host}:PORT to accept that, or use --transport tcp"
            )
        if self.transport == "ucx" and port == 0 and self.advertise is None:
            raise ConfigError("--transport ucx with --listen on port 0 needs --advertise HOST:PORT")
        if self.preset not in PRESETS:
            raise ConfigError(f"--mesh-preset must be one of {PRESETS}, got {self.preset!r}")
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ConfigError(f"--replicas must be an integer >= 1, got {self.replicas!r}")
        for name in (
            "tick_interval_s",
            "connect_timeout_s",
            "send_timeout_s",
            "lookup_timeout_s",
            "pull_timeout_s",
            "holder_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"mesh: {name} must be > 0")
        for name in ("max_concurrent_pulls", "connections_per_peer", "control_queue_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mesh: {name} must be >= 1")

    @classmethod
    def from_preset(cls, preset: str, **fields: object) -> MeshNodeConfig:
        """A config whose timings follow ``preset`` (``lan`` or ``local``)."""
        if preset == "local":
            fields.setdefault("membership", MembershipConfig.LOCAL())
            fields.setdefault(
                "directory", DirectoryConfig(reannounce_interval_s=5.0, entry_ttl_s=15.0)
            )
            fields.setdefault("holder_timeout_s", 1.0)
        elif preset != "lan":
            raise ConfigError(f"--mesh-preset must be one of {PRESETS}, got {preset!r}")
        return cls(preset=preset, **fields)  # type: ignore[arg-type]


def read_secret(path: str | os.PathLike[str]) -> bytes:
    """The secret in ``path`` without surrounding whitespace; clear errors otherwise."""
    p = Path(path)
    try:
        check_private_file(p, "mesh secret file")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"mesh secret file {str(p)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"mesh secret file {str(p)!r} cannot be read: {exc}") from exc
    secret = raw.strip()
    if not secret:
        raise ConfigError(f"mesh secret file {str(p)!r} is empty")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"mesh secret in {str(p)!r} is {len(secret)} bytes; at least {MIN_SECRET_BYTES} needed"
        )
    return secret
