"""A small discrete-event simulator that drives the real sans-IO membership core.

Virtual clock, in-memory network with per-message loss and latency, partitions, crashes,
pauses, restarts and graceful leaves. Everything random comes from ``random.Random``
instances derived from the seed, so a run is byte-for-byte reproducible: ``log_digest()``
hashes the ordered membership event log of every node.

The simulator calls exactly the API the agent's shell calls: ``join``, ``tick`` at
``next_deadline()``, ``handle`` for each delivered message, ``leave`` and ``drain_events``.
With ``directory`` set, every node also runs a ``Directory`` core and, like the shell,
derives its ``Ring`` from the alive members after each JOINED/DEAD/LEFT event.
With ``wire=True`` every message also takes a msgpack round trip through
``to_wire()``/``decode()``.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgpack

from meshkv.mesh.config import DirectoryConfig, MembershipConfig, RingConfig
from meshkv.mesh.directory import Directory
from meshkv.mesh.membership import EventKind, Membership
from meshkv.mesh.messages import Announce, Handoff, Lookup, LookupReply, Message, Outgoing, decode
from meshkv.mesh.ring import Ring

_DIRECTORY_MESSAGES = (Announce, Handoff, Lookup, LookupReply)
_RING_CHANGES = (EventKind.JOINED, EventKind.DEAD, EventKind.LEFT)

_DELIVER, _TICK, _CALL = 0, 1, 2


class NodeState(enum.Enum):
    UP = "up"
    PAUSED = "paused"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One membership event as seen by ``observer``."""

    time: float
    observer: str
    kind: EventKind
    node: str
    incarnation: int

    def line(self) -> str:
        return f"{self.time:.6f} {self.observer} {self.kind.value} {self.node} {self.incarnation}"


@dataclass(slots=True)
class SimNode:
    node_id: str
    addr: str
    core: Membership
    state: NodeState = NodeState.UP
    tick_at: float = math.inf
    directory: Directory | None = None
    ring: Ring | None = None


@dataclass(slots=True)
class NetStats:
    sent: int = 0
    lost: int = 0
    blocked: int = 0
    undeliverable: int = 0
    delivered: int = 0


@dataclass(slots=True)
class Sim:
    """The simulated mesh. Schedule actions with ``at(t, fn)`` or the helpers, then ``run``."""

    seed: int
    config: MembershipConfig = field(default_factory=MembershipConfig.LAN)
    loss: float = 0.0
    latency: tuple[float, float] = (0.0005, 0.002)
    wire: bool = False
    directory: DirectoryConfig | None = None
    ring_config: RingConfig = field(default_factory=RingConfig)
    now: float = 0.0
    nodes: dict[str, SimNode] = field(default_factory=dict)
    log: list[LogRecord] = field(default_factory=list)
    net: NetStats = field(default_factory=NetStats)
    listeners: list[Callable[[LogRecord], None]] = field(default_factory=list)
    _by_addr: dict[str, SimNode] = field(default_factory=dict)
    _heap: list[tuple[float, int, int, object, object, object]] = field(default_factory=list)
    _seq: int = 0
    _rng: random.Random = field(init=False)
    _groups: dict[str, int] = field(default_factory=dict)
    _restarts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.loss < 1:
            raise ValueError("loss must be in [0, 1)")
        self._rng = random.Random(f"net/{self.seed}")

    # -- scheduling ----------------------------------------------------------------------

    def at(self, t: float, fn: Callable[[], None]) -> None:
        """Run ``fn()`` at virtual time ``t``."""
        self._push(t, _CALL, fn, None, None)

    def run(self, until: float) -> None:
        """Process events up to and including virtual time ``until``."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            t, _, kind, a, b, c = heapq.heappop(heap)
            self.now = t
            if kind == _DELIVER:
                self._deliver(a, b, c)  # type: ignore[arg-type]
            elif kind == _TICK:
                node: SimNode = a  # type: ignore[assignment]
                if node.tick_at == t and node.state is NodeState.UP and node.core is b:
                    node.tick_at = math.inf
                    out = node.core.tick(t)
                    if node.directory is not None:
                        out.extend(node.directory.tick(t))
                    self._after(node, out)
            else:
                a()  # type: ignore[operator]
        self.now = until

    def _push(self, t: float, kind: int, a: object, b: object, c: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a, b, c))

    # -- nodes ---------------------------------------------------------------------------

    def add_node(self, node_id: str, seeds: Iterable[str] = (), at: float | None = None) -> None:
        """Start ``node_id`` (address ``<id>:7946``) at time ``at`` and join via ``seeds``."""
        t = self.now if at is None else at
        seed_list = list(seeds)
        self.at(t, lambda: self._start(node_id, seed_list))

    def _start(self, node_id: str, seeds: list[str]) -> None:
        gen = self._restarts.get(node_id, 0)
        self._restarts[node_id] = gen + 1
        rng = random.Random(f"node/{self.seed}/{node_id}/{gen}")
        addr = f"{node_id}:7946"
        core = Membership(node_id, addr, self.config, rng, self.now)
        node = SimNode(node_id, addr, core)
        if self.directory is not None:
            drng = random.Random(f"dir/{self.seed}/{node_id}/{gen}")
            node.directory = Directory(node_id, self.directory, drng, self.now)
            node.ring = Ring([node_id], self.ring_config)
            node.directory.set_ring(node.ring, {node_id: addr}, self.now)
        self.nodes[node_id] = node
        self._by_addr[addr] = node
        self._after(node, core.join([f"{s}:7946" for s in seeds], self.now))

    def crash(self, node_id: str, at: float) -> None:
        self.at(at, lambda: self._set_state(node_id, NodeState.DOWN))

    def restart(self, node_id: str, at: float, seeds: Iterable[str]) -> None:
        """A crashed node comes back as a fresh process (incarnation 0)."""
        self.add_node(node_id, seeds, at)

    def pause(self, node_id: str, at: float, duration: float) -> None:
        """Freeze a node (no ticks, incoming messages lost) for ``duration`` seconds."""
        self.at(at, lambda: self._set_state(node_id, NodeState.PAUSED))
        self.at(at + duration, lambda: self._resume(node_id))

    def leave(self, node_id: str, at: float) -> None:
        """Graceful leave: LEFT is gossiped, the node stops after ``leave_propagate_s``."""

        def go() -> None:
            node = self.nodes[node_id]
            self._after(node, node.core.leave(self.now))
            self.crash(node_id, self.now + self.config.leave_propagate_s)

        self.at(at, go)

    def partition(self, groups: list[list[str]], at: float) -> None:
        """From ``at`` on, messages between different groups are lost (others: group 0)."""

        def go() -> None:
            self._groups = {f"{n}:7946": i + 1 for i, members in enumerate(groups) for n in members}

        self.at(at, go)

    def heal(self, at: float) -> None:
        self.at(at, lambda: self._groups.clear())

    def act(self, node_id: str, fn: Callable[[SimNode, float], list[Outgoing] | None]) -> None:
        """Call ``fn(node, now)`` now, send what it returns and reschedule the node's timers
        (as the agent's shell does after any direct call into a core)."""
        node = self.nodes[node_id]
        self._after(node, fn(node, self.now) or [])

    def _set_state(self, node_id: str, state: NodeState) -> None:
        self.nodes[node_id].state = state

    def _resume(self, node_id: str) -> None:
        node = self.nodes[node_id]
        node.state = NodeState.UP
        node.tick_at = math.inf
        self._schedule(node)

    # -- network -------------------------------------------------------------------------

    def _after(self, node: SimNode, out: list[Outgoing]) -> None:
        for o in out:
            self._send(node.addr, o.to, o.msg)
        ring_changed = False
        for e in node.core.drain_events():
            rec = LogRecord(e.time, node.node_id, e.kind, e.node, e.incarnation)
            self.log.append(rec)
            ring_changed = ring_changed or e.kind in _RING_CHANGES
            for fn in self.listeners:
                fn(rec)
        if ring_changed and node.directory is not None and node.ring is not None:
            core = node.core
            ring = node.ring.derive(core.alive())
            if ring is not node.ring:
                node.ring = ring
                addrs = {m: core.address_of(m) or "" for m in ring.members}
                for o in node.directory.set_ring(ring, addrs, self.now):
                    self._send(node.addr, o.to, o.msg)
        self._schedule(node)

    def _schedule(self, node: SimNode) -> None:
        d = node.core.next_deadline()
        if node.directory is not None:
            d = min(d, node.directory.next_deadline())
        d = max(d, self.now)
        if d < node.tick_at:
            node.tick_at = d
            self._push(d, _TICK, node, node.core, None)

    def _send(self, src: str, dst: str, msg: Message) -> None:
        self.net.sent += 1
        if self._groups and self._groups.get(src, 0) != self._groups.get(dst, 0):
            self.net.blocked += 1
            return
        rng = self._rng
        if self.loss and rng.random() < self.loss:
            self.net.lost += 1
            return
        if self.wire:
            msg = decode(msgpack.unpackb(msgpack.packb(msg.to_wire())))
        lo, hi = self.latency
        self._push(self.now + lo + (hi - lo) * rng.random(), _DELIVER, dst, src, msg)

    def _deliver(self, dst: str, src: str, msg: Message) -> None:
        node = self._by_addr.get(dst)
        if node is None or node.state is not NodeState.UP:
            self.net.undeliverable += 1
            return
        self.net.delivered += 1
        if isinstance(msg, _DIRECTORY_MESSAGES):
            if node.directory is None:
                self.net.undeliverable += 1
                return
            self._after(node, node.directory.handle(src, msg, self.now))
        else:
            self._after(node, node.core.handle(src, msg, self.now))

    # -- observation ---------------------------------------------------------------------

    def up(self) -> list[str]:
        return [n for n, s in self.nodes.items() if s.state is NodeState.UP]

    def converged(self, expected: Iterable[str] | None = None) -> bool:
        """True when every up node sees exactly ``expected`` (default: the up nodes) alive."""
        want = sorted(self.up() if expected is None else expected)
        return all(self.nodes[n].core.alive() == want for n in want)

    def log_digest(self) -> str:
        h = hashlib.sha256()
        for rec in self.log:
            h.update(rec.line().encode())
            h.update(b"\n")
        return h.hexdigest()


def node_name(i: int) -> str:
    return f"n{i:04d}"


def start_cluster(sim: Sim, n: int, spacing: float = 0.02) -> list[str]:
    """Add ``n`` nodes, node i at ``i * spacing`` seconds, all joining through node 0."""
    names = [node_name(i) for i in range(n)]
    sim.add_node(names[0], (), at=0.0)
    for i, name in enumerate(names[1:], start=1):
        sim.add_node(name, [names[0]], at=i * spacing)
    return names


def run_until_converged(sim: Sim, limit: float, step: float = 0.5) -> float | None:
    """Advance in ``step`` increments until ``converged()``; the time, or None at ``limit``."""
    while sim.now < limit:
        sim.run(sim.now + step)
        if sim.converged():
            return sim.now
    return None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(s)))
    return s[rank - 1]
