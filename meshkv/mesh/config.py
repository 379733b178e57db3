"""Typed configuration of the mesh's sans-IO cores: membership, ring and directory.

``MembershipConfig.LAN()`` follows hashicorp/memberlist's ``DefaultLANConfig`` except where
our simulations measured a reason to differ (see ``docs/mesh.md``); ``MembershipConfig.LOCAL()``
is a faster variant for loopback tests. All times are seconds of whatever clock the shell
passes in (``loop.time()`` in the agent, virtual time in ``simulations/``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from meshkv.errors import ConfigError


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    """SWIM + Lifeguard failure detection and gossip dissemination."""

    probe_interval_s: float = 1.0
    """Time between two failure-detector probes (one member per interval, round robin)."""
    probe_timeout_s: float = 0.5
    """How long to wait for a direct ack before asking ``indirect_checks`` peers to probe.
    Should be about the 99th percentile of the network round trip."""
    indirect_checks: int = 3
    """Peers asked to probe a member that missed its direct ack (PING_REQ fan-out)."""
    suspicion_mult: float = 1.5
    """Lifeguard minimum suspicion timeout = ``suspicion_mult * max(1, log10(N)) *
    probe_interval_s``. memberlist uses 4 (7.2 s at N=64), which alone exceeds the 8 s p99
    crash-detection target; with 1.5 (2.7 s at N=64) ``simulations/detection.py`` measures
    p99 7.2-7.7 s over 80-240 crashes at 1 % loss, and refutation still has ample time (no
    false DEAD in ``simulations/faults.py``)."""
    suspicion_confirmations: int = 2
    """Lifeguard k: independent confirmations that shrink a suspicion from the maximum to
    the minimum timeout (memberlist derives it as ``suspicion_mult - 2``). Clamped to
    ``N - 2`` in small meshes; 0 means always the minimum."""
    suspicion_max_timeout_mult: float = 6.0
    """Maximum suspicion timeout = this times the minimum. A fresh suspicion starts at the
    maximum and shrinks toward the minimum as independent peers confirm it."""
    retransmit_mult: int = 5
    """Each gossiped update is sent ``retransmit_mult * ceil(log10(N + 1))`` times.
    memberlist uses 4; at N=64 and 1 % loss that leaves ~1e-3 of (update, member) pairs
    unreached until the next push-pull, 5 leaves < 1e-4 (``simulations/dissemination.py``)."""
    gossip_interval_s: float = 0.2
    """Period of the dedicated gossip fan-out (only sent while updates are queued)."""
    gossip_nodes: int = 3
    """Random members sent queued updates every ``gossip_interval_s``."""
    gossip_to_dead_s: float = 30.0
    """Members declared dead are still gossiped to for this long, so a member that was only
    paused learns it was declared dead and refutes."""
    max_piggyback: int = 16
    """Most updates carried by one message (keeps a message within one UDP-sized frame)."""
    broadcast_queue_limit: int = 1024
    """Most queued updates; beyond it the most-retransmitted ones are dropped."""
    push_pull_interval_s: float = 30.0
    """Period of full-state anti-entropy with one random member. Scaled up above 32 members
    (``x (ceil(log2 N - log2 32) + 1)``) as memberlist does, to bound total traffic."""
    reconnect_interval_s: float = 10.0
    """Period of a push-pull with one random *dead* member, which heals partitions: each
    side learns the other declared it dead and refutes with a higher incarnation."""
    dead_retention_s: float = 300.0
    """How long dead or left members are remembered (so old gossip cannot resurrect them
    and the reconnect loop can try them). Must exceed any update's gossip lifetime."""
    awareness_max_multiplier: int = 8
    """Lifeguard local-health cap: probe interval and timeout are scaled by
    ``1 + health`` with ``0 <= health < awareness_max_multiplier``."""
    leave_propagate_s: float = 1.0
    """After ``leave()`` the shell keeps driving the core this long so the LEFT update spreads."""
    leave_fanout: int = 6
    """Members sent the LEFT update immediately on ``leave()``."""
    max_pending_forwards: int = 256
    """Most indirect probes this node relays at once for others (PING_REQ); more are refused."""
    event_queue_limit: int = 65536
    """Most undrained membership events; older ones are dropped and counted."""

    def __post_init__(self) -> None:
        positive = (
            "probe_interval_s",
            "probe_timeout_s",
            "suspicion_mult",
            "gossip_interval_s",
            "push_pull_interval_s",
            "reconnect_interval_s",
            "dead_retention_s",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"membership: {name} must be > 0, got {getattr(self, name)!r}")
        if self.probe_timeout_s >= self.probe_interval_s:
            raise ConfigError("membership: probe_timeout_s must be shorter than probe_interval_s")
        if self.suspicion_max_timeout_mult < 1:
            raise ConfigError("membership: suspicion_max_timeout_mult must be >= 1")
        for name in (
            "indirect_checks",
            "retransmit_mult",
            "gossip_nodes",
            "max_piggyback",
            "broadcast_queue_limit",
            "awareness_max_multiplier",
            "max_pending_forwards",
            "event_queue_limit",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"membership: {name} must be >= 1, got {getattr(self, name)!r}")
        if self.suspicion_confirmations < 0:
            raise ConfigError("membership: suspicion_confirmations must be >= 0")
        if self.gossip_to_dead_s < 0 or self.leave_propagate_s < 0 or self.leave_fanout < 0:
            raise ConfigError("membership: gossip_to_dead_s/leave_* must be >= 0")

    @classmethod
    def LAN(cls) -> MembershipConfig:
        """Datacenter network: probe 1 s, probe timeout 500 ms, 3 indirect checks."""
        return cls()

    @classmethod
    def LOCAL(cls) -> MembershipConfig:
        """Loopback / single-host tests: everything about 5x faster than LAN."""
        return cls(
            probe_interval_s=0.2,
            probe_timeout_s=0.1,
            suspicion_mult=3.0,
            gossip_interval_s=0.05,
            gossip_to_dead_s=5.0,
            push_pull_interval_s=5.0,
            reconnect_interval_s=2.0,
            dead_retention_s=60.0,
            leave_propagate_s=0.3,
        )

    def with_(self, **changes: object) -> MembershipConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class RingConfig:
    """Consistent-hash ring with virtual nodes."""

    vnodes: int = 4096
    """Virtual nodes per member. Measured over 8..64 members (``simulations/ring_balance.py``,
    seed 1): 2048 gives ownership max/mean 1.074, 4096 gives 1.038, so that even the largest
    member's leave moves <= 1.05/N of the keys (a leave moves exactly the leaver's share).
    Build cost grows linearly (~0.25 s for 256 members on a busy 2-core machine;
    ``Ring.derive`` rebuilds incrementally on membership changes)."""
    seed: int = 0
    """Mixed into every virtual-node hash; all nodes of one mesh must use the same value."""

    def __post_init__(self) -> None:
        if not 1 <= self.vnodes <= 65536:
            raise ConfigError(f"ring: vnodes must be in 1..65536, got {self.vnodes!r}")
        if not 0 <= self.seed < 1 << 64:
            raise ConfigError("ring: seed must fit in 64 bits")


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    """Key -> holders directory kept at each key's home node."""

    batch_max_keys: int = 512
    """Most keys (adds + drops) in one announcement message."""
    flush_interval_s: float = 0.05
    """Longest time a queued add/drop waits before it is sent to its home."""
    pending_limit: int = 100_000
    """Most queued adds/drops; beyond it new ones are dropped (the periodic re-announce
    repairs them) and counted in ``stats.pending_dropped``."""
    reannounce_interval_s: float = 60.0
    """Every held key is re-announced to its home once per this period, spread evenly over
    it, which repairs lost announcements and homes that restarted."""
    entry_ttl_s: float = 150.0
    """A holder not re-announced for this long is forgotten by the home (must exceed
    ``reannounce_interval_s`` with margin for lost messages)."""
    max_entries: int = 1_000_000
    """Most keys a home keeps; beyond it the oldest key is evicted."""
    max_holders_per_key: int = 32
    """Most holders remembered per key (the least recently announced is replaced)."""
    handoff_batch: int = 512
    """Most entries per handoff message when a key's home moves."""

    def __post_init__(self) -> None:
        for name in ("flush_interval_s", "reannounce_interval_s", "entry_ttl_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"directory: {name} must be > 0")
        if self.entry_ttl_s <= self.reannounce_interval_s:
            raise ConfigError("directory: entry_ttl_s must exceed reannounce_interval_s")
        for name in (
            "batch_max_keys",
            "pending_limit",
            "max_entries",
            "max_holders_per_key",
            "handoff_batch",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"directory: {name} must be >= 1")
