"""Who is alive: SWIM failure detection with the Lifeguard refinements, as a sans-IO core.

``Membership`` never touches sockets, clocks or global randomness. The shell (the agent's
``mesh/node.py`` or ``simulations/sim.py``) drives it:

* ``tick(now)`` when ``next_deadline()`` has passed, ``handle(src, msg, now)`` for every
  received message; both return ``Outgoing`` messages to send;
* ``join(seeds, now)`` once at start, ``leave(now)`` at shutdown;
* ``drain_events()`` for JOINED / SUSPECT / ALIVE / DEAD / LEFT events.

Protocol (SWIM, memberlist-style): each probe interval one member (round robin, order
shuffled per round) gets a PING; without an ACK within the probe timeout ``indirect_checks``
random peers are asked to probe it (PING_REQ), and they answer NACK when they cannot reach
it either. A failed probe makes the target SUSPECT; the suspected member refutes by
gossiping ALIVE with a higher incarnation, otherwise the suspicion expires into DEAD.
Lifeguard: the suspicion timeout starts at its maximum and shrinks toward the minimum as
independent members confirm it; a node that misses acks or nacks, or has to refute, raises
its local-health score, which stretches its own probe interval and timeout. Updates are
piggybacked on every message (each ``retransmit_mult * ceil(log10(N+1))`` times) and fanned
out to ``gossip_nodes`` random members every gossip interval; full state is exchanged with
one random member every push-pull interval and with one random dead member every reconnect
interval (which heals partitions). Dead and left members are remembered for
``dead_retention_s`` so that stale gossip cannot resurrect them.
"""

from __future__ import annotations

import enum
import logging
import math
import random
from collections import deque
from dataclasses import dataclass, replace

from meshkv.mesh.config import MembershipConfig
from meshkv.mesh.messages import (
    Ack,
    Gossip,
    Message,
    Nack,
    Outgoing,
    Ping,
    PingReq,
    PushPull,
    State,
    Update,
    Updates,
)

log = logging.getLogger(__name__)

_INF = math.inf
_NACK_FRACTION = 0.8
_MAX_CLAIMS = 16  # addresses remembered between two take_claims() calls
"""A relay sends its NACK at this fraction of its probe timeout, so that the NACK reaches
the requester before the requester's probe interval ends."""


class EventKind(enum.StrEnum):
    """What changed about a member."""

    JOINED = "joined"
    """First seen alive, or alive again after DEAD/LEFT (with a higher incarnation)."""
    SUSPECT = "suspect"
    ALIVE = "alive"
    """A suspicion was refuted."""
    DEAD = "dead"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A membership change for the shell (ring, directory, metrics)."""

    kind: EventKind
    node: str
    addr: str
    incarnation: int
    time: float


@dataclass(slots=True)
class Member:
    """This node's view of one member."""

    node: str
    addr: str
    incarnation: int
    state: State
    since: float
    """Time of the last state change (drives dead-member retention)."""

    def update(self, state: State | None = None) -> Update:
        st = self.state if state is None else state
        return Update(self.node, self.addr, self.incarnation, st, self.node)


@dataclass(slots=True)
class MembershipStats:
    """Counters for metrics."""

    probes: int = 0
    probe_failures: int = 0
    refutes: int = 0
    relays_refused: int = 0
    broadcasts_dropped: int = 0
    events_dropped: int = 0
    messages_ignored: int = 0


@dataclass(slots=True)
class _Suspicion:
    """Lifeguard suspicion timer: timeout shrinks with independent confirmations."""

    start: float
    min_s: float
    max_s: float
    k: int
    confirmers: set[str]
    deadline: float = 0.0

    def __post_init__(self) -> None:
        self.deadline = self.start + (self.min_s if self.k < 1 else self.max_s)

    def confirm(self, origin: str) -> bool:
        """Count ``origin`` once; returns True when it was a new independent confirmation."""
        if self.k < 1 or origin in self.confirmers or len(self.confirmers) > self.k:
            return False
        self.confirmers.add(origin)
        n = len(self.confirmers) - 1
        frac = math.log(n + 1) / math.log(self.k + 1)
        timeout = max(self.min_s, self.max_s - (self.max_s - self.min_s) * frac)
        self.deadline = self.start + timeout
        return True


class _BroadcastQueue:
    """Bounded, transmit-limited queue of updates: one entry per member (a newer update
    replaces an older one); the least-transmitted, then newest, go first.

    Entries live in one bucket per transmit count (insertion-ordered dicts), so taking
    ``k`` updates costs O(k) rather than a sort of the whole queue.
    """

    __slots__ = ("_buckets", "_where", "_limit", "dropped")

    def __init__(self, limit: int) -> None:
        self._buckets: list[dict[str, Update]] = [{}]
        self._where: dict[str, int] = {}  # node -> bucket (transmits so far)
        self._limit = limit
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._where)

    def add(self, u: Update) -> None:
        t = self._where.pop(u.node, None)
        if t is not None:
            del self._buckets[t][u.node]
        self._buckets[0][u.node] = u
        self._where[u.node] = 0
        while len(self._where) > self._limit:
            # drop the most-transmitted, oldest entry
            b = next(b for b in reversed(self._buckets) if b)
            node = next(iter(b))
            del b[node]
            del self._where[node]
            self.dropped += 1

    def take(self, max_count: int, transmit_limit: int) -> Updates:
        if not self._where:
            return ()
        chosen: list[tuple[int, Update]] = []
        for t, b in enumerate(self._buckets):
            if b:
                for u in reversed(b.values()):
                    chosen.append((t, u))
                    if len(chosen) >= max_count:
                        break
                if len(chosen) >= max_count:
                    break
        buckets = self._buckets
        for t, u in chosen:
            del buckets[t][u.node]
            if t + 1 >= transmit_limit:
                del self._where[u.node]
                continue
            if t + 1 == len(buckets):
                buckets.append({})
            buckets[t + 1][u.node] = u
            self._where[u.node] = t + 1
        return tuple(u for _, u in chosen)


class Membership:
    """SWIM + Lifeguard membership of one node (sans-IO)."""

    def __init__(
        self,
        node_id: str,
        addr: str,
        config: MembershipConfig,
        rng: random.Random,
        now: float,
        *,
        incarnation: int = 0,
    ) -> None:
        """``incarnation``: start value; a restarted node may pass a persisted one, but
        need not: it learns its old incarnation from peers and refutes above it."""
        if not node_id or not addr:
            raise ValueError("membership: node_id and addr must be non-empty")
        self.node_id = node_id
        self.addr = addr
        self.config = config
        self.incarnation = incarnation
        self.health = 0
        """Lifeguard local-health score (0 = healthy)."""
        self.stats = MembershipStats()
        self._rng = rng
        self._members: dict[str, Member] = {}
        self._live_cache: list[str] | None = None
        self._states_cache: Updates | None = None
        self._recent_dead: dict[str, float] = {}
        self._suspicions: dict[str, _Suspicion] = {}
        self._queue = _BroadcastQueue(config.broadcast_queue_limit)
        self._events: deque[MemberEvent] = deque()
        self._seq = 0
        self._leaving = False
        self._claims: set[str] = set()
        self._seeds: tuple[str, ...] = ()
        # current probe: target, seq, times, ack/nack state
        self._probe_target: str | None = None
        self._probe_seq = -1
        self._probe_inc = 0
        self._probe_acked = False
        self._probe_indirect_at = _INF
        self._probe_end = now
        self._expected_nacks = 0
        self._nacks = 0
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._relays: dict[int, tuple[str, int, float]] = {}  # my seq -> (requester, seq, nack at)
        self._next_gossip = now
        self._next_push_pull = now + rng.uniform(0, 1) * self._push_pull_period()
        self._next_reconnect = now + rng.uniform(0.5, 1.5) * config.reconnect_interval_s
        self._next_reap = now + config.dead_retention_s / 10
        self._queue.add(self._self_update())

    # -- public API ----------------------------------------------------------------------

    def join(self, seeds: list[str], now: float) -> list[Outgoing]:
        """Start joining through ``seeds`` (addresses): a push-pull with each. Retried every
        reconnect interval while no other member is known alive."""
        self._seeds = tuple(s for s in seeds if s != self.addr)
        return [Outgoing(s, self._push_pull_msg(reply=False, join=True)) for s in self._seeds]

    def leave(self, now: float) -> list[Outgoing]:
        """Announce a graceful leave (LEFT, not dead). Keep calling ``tick`` for
        ``config.leave_propagate_s`` so the update spreads, then stop."""
        self._leaving = True
        u = Update(self.node_id, self.addr, self.incarnation, State.LEFT, self.node_id)
        self._queue.add(u)
        targets = self._gossip_targets(self.config.leave_fanout)
        return [Outgoing(self._members[t].addr, Gossip(self.node_id, (u,))) for t in targets]

    def bump_incarnation(self, now: float) -> None:
        """Gossip ALIVE with a higher incarnation (e.g. after an address change)."""
        self.incarnation += 1
        self._broadcast(self._self_update())

    def drain_events(self) -> list[MemberEvent]:
        """Membership changes since the last call, oldest first."""
        out = list(self._events)
        self._events.clear()
        return out

    def member(self, node: str) -> Member | None:
        """A copy of this node's record of ``node`` (None if unknown or forgotten)."""
        m = self._members.get(node)
        return None if m is None else replace(m)

    def members(self) -> list[Member]:
        """Copies of every remembered member except this node (including dead/left ones)."""
        return [replace(m) for m in self._members.values()]

    def alive(self) -> list[str]:
        """Ids of members considered alive (ALIVE or SUSPECT), this node included, sorted."""
        return sorted([*self._live(), self.node_id])

    def address_of(self, node: str) -> str | None:
        if node == self.node_id:
            return self.addr
        m = self._members.get(node)
        return None if m is None else m.addr

    @property
    def num_alive(self) -> int:
        """Members considered alive, this node included."""
        return len(self._live()) + 1

    def next_deadline(self) -> float:
        """The earliest time ``tick`` has work to do."""
        t = _INF
        if not self._leaving:
            t = self._probe_end if self._probe_indirect_at == _INF else self._probe_indirect_at
            t = min(t, self._next_push_pull, self._next_reconnect)
        if self._queue:
            t = min(t, self._next_gossip)
        t = min(t, self._next_reap)
        for s in self._suspicions.values():
            t = min(t, s.deadline)
        for r in self._relays.values():
            t = min(t, r[2])
        return t

    def tick(self, now: float) -> list[Outgoing]:
        """Run every timer that is due at ``now``."""
        out: list[Outgoing] = []
        if self._suspicions:
            for node in [n for n, s in self._suspicions.items() if s.deadline <= now]:
                self._expire_suspicion(node, now)
        if self._relays:
            for seq in [q for q, r in self._relays.items() if r[2] <= now]:
                requester, their_seq, _ = self._relays.pop(seq)
                out.append(Outgoing(requester, Nack(their_seq, self.node_id)))
        if not self._leaving:
            self._tick_probe(now, out)
            if now >= self._next_push_pull:
                self._next_push_pull = now + self._push_pull_period()
                live = self._live()
                if live:
                    peer = self._members[self._rng.choice(live)]
                    out.append(Outgoing(peer.addr, self._push_pull_msg(reply=False)))
            if now >= self._next_reconnect:
                self._next_reconnect = now + self.config.reconnect_interval_s
                self._reconnect(out)
        if now >= self._next_gossip and self._queue:
            self._next_gossip = now + self.config.gossip_interval_s
            for t in self._gossip_targets(self.config.gossip_nodes):
                ups = self._take_updates()
                if not ups:
                    break
                out.append(Outgoing(self._members[t].addr, Gossip(self.node_id, ups)))
        if now >= self._next_reap:
            self._next_reap = now + self.config.dead_retention_s / 10
            self._reap(now)
        return out

    def handle(self, src: str, msg: Message, now: float) -> list[Outgoing]:
        """Process one received message; ``src`` is the sender's address (replies go there)."""
        out: list[Outgoing] = []
        if isinstance(msg, Ping):
            self._merge(msg.updates, now)
            if msg.target != self.node_id:
                self.stats.messages_ignored += 1
                log.debug("ping for %s reached %s; ignored", msg.target, self.node_id)
                return out
            ups = self._take_updates()
            sender = self._members.get(msg.sender)
            if sender is not None and sender.state is State.DEAD:
                # tell a member we consider dead (e.g. it was paused) so that it refutes
                ups = (Update(sender.node, sender.addr, sender.incarnation, State.DEAD,
                              self.node_id), *ups)  # fmt: skip
            out.append(Outgoing(src, Ack(msg.seq, self.node_id, ups)))
        elif isinstance(msg, Ack):
            self._merge(msg.updates, now)
            if msg.seq == self._probe_seq and self._probe_target is not None:
                if not self._probe_acked:
                    self._probe_acked = True
                    self._probe_indirect_at = _INF
                    self.health = max(0, self.health - 1)
            elif msg.seq in self._relays:
                requester, their_seq, _ = self._relays.pop(msg.seq)
                out.append(Outgoing(requester, Ack(their_seq, self.node_id, self._take_updates())))
        elif isinstance(msg, PingReq):
            self._merge(msg.updates, now)
            if len(self._relays) >= self.config.max_pending_forwards:
                self.stats.relays_refused += 1
                return out
            self._seq += 1
            nack_at = now + _NACK_FRACTION * self.config.probe_timeout_s
            self._relays[self._seq] = (src, msg.seq, nack_at)
            ping = Ping(self._seq, self.node_id, msg.target, self._take_updates())
            out.append(Outgoing(msg.target_addr, ping))
        elif isinstance(msg, Nack):
            if msg.seq == self._probe_seq:
                self._nacks += 1
        elif isinstance(msg, Gossip):
            self._merge(msg.updates, now)
        elif isinstance(msg, PushPull):
            if not msg.reply:
                out.append(Outgoing(src, self._push_pull_msg(reply=True)))
            self._merge(msg.states, now, push_pull_from=msg.sender)
        else:
            self.stats.messages_ignored += 1
            log.debug("membership ignores %s", type(msg).__name__)
        return out

    # -- probing -------------------------------------------------------------------------

    def _tick_probe(self, now: float, out: list[Outgoing]) -> None:
        target = self._probe_target
        if target is not None and not self._probe_acked and now >= self._probe_indirect_at:
            self._probe_indirect_at = _INF
            m = self._members.get(target)
            if m is not None:
                live = [n for n in self._live() if n != target]
                k = min(self.config.indirect_checks, len(live))
                peers = self._rng.sample(live, k) if k else []
                self._expected_nacks = len(peers)
                for p in peers:
                    req = PingReq(self._probe_seq, self.node_id, target, m.addr,
                                  self._take_updates())  # fmt: skip
                    out.append(Outgoing(self._members[p].addr, req))
        if now < self._probe_end:
            return
        if target is not None:
            self._finish_probe(target, now)
        scale = 1 + self.health
        self._probe_end = now + self.config.probe_interval_s * scale
        self._probe_indirect_at = _INF
        nxt = self._next_probe_target()
        self._probe_target = nxt
        if nxt is None:
            return
        self._seq += 1
        self._probe_seq = self._seq
        self._probe_inc = self._members[nxt].incarnation
        self._probe_acked = False
        self._expected_nacks = 0
        self._nacks = 0
        self._probe_indirect_at = now + self.config.probe_timeout_s * scale
        self.stats.probes += 1
        ups = self._take_updates()
        m = self._members[nxt]
        if m.state is State.SUSPECT:
            # Lifeguard buddy system: tell a suspect directly, so it can refute at once
            ups = (Update(nxt, m.addr, m.incarnation, State.SUSPECT, self.node_id), *ups)
        ping = Ping(self._probe_seq, self.node_id, nxt, ups)
        out.append(Outgoing(self._members[nxt].addr, ping))

    def _finish_probe(self, target: str, now: float) -> None:
        self._probe_target = None
        if self._probe_acked:
            return
        self.stats.probe_failures += 1
        if self._expected_nacks:
            self._add_health(self._expected_nacks - self._nacks)
        else:
            self._add_health(1)
        m = self._members.get(target)
        if m is not None and m.state in (State.ALIVE, State.SUSPECT):
            log.debug("%s: probe of %s failed; suspecting", self.node_id, target)
            # suspect at the incarnation the probe started with (as memberlist does): a
            # refutation that arrived meanwhile outranks this probe's evidence
            u = Update(target, m.addr, self._probe_inc, State.SUSPECT, self.node_id)
            self._on_suspect(u, now)

    def _next_probe_target(self) -> str | None:
        for _ in range(2):
            while self._probe_index < len(self._probe_order):
                node = self._probe_order[self._probe_index]
                self._probe_index += 1
                m = self._members.get(node)
                if m is not None and m.state in (State.ALIVE, State.SUSPECT):
                    return node
            self._probe_order = list(self._live())
            self._rng.shuffle(self._probe_order)
            self._probe_index = 0
        return None

    def _add_health(self, delta: int) -> None:
        self.health = min(self.config.awareness_max_multiplier - 1, max(0, self.health + delta))

    # -- dissemination -------------------------------------------------------------------

    def _take_updates(self) -> Updates:
        n = len(self._members) + 1
        limit = self.config.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))
        return self._queue.take(self.config.max_piggyback, limit)

    def _broadcast(self, u: Update) -> None:
        self._states_cache = None  # every state change is broadcast
        before = self._queue.dropped
        self._queue.add(u)
        self.stats.broadcasts_dropped += self._queue.dropped - before

    def _gossip_targets(self, k: int) -> list[str]:
        cands = self._live()
        if self._recent_dead:
            cands = cands + list(self._recent_dead)
        if len(cands) <= k:
            return list(cands)
        return self._rng.sample(cands, k)

    def _push_pull_period(self) -> float:
        n = len(self._members) + 1
        base = self.config.push_pull_interval_s
        if n <= 32:
            return base
        return base * (math.ceil(math.log2(n) - math.log2(32)) + 1)

    def _push_pull_msg(self, *, reply: bool, join: bool = False) -> PushPull:
        if self._states_cache is None:
            states = [self._self_update()]
            states.extend(m.update() for m in self._members.values())
            self._states_cache = tuple(states)
        return PushPull(self.node_id, self._states_cache, reply, join)

    def _reconnect(self, out: list[Outgoing]) -> None:
        if self._seeds and not self._live():
            for s in self._seeds:
                out.append(Outgoing(s, self._push_pull_msg(reply=False, join=True)))
            return
        dead = [m for m in self._members.values() if m.state is State.DEAD]
        if dead:
            m = self._rng.choice(dead)
            out.append(Outgoing(m.addr, self._push_pull_msg(reply=False)))

    # -- state merging -------------------------------------------------------------------

    def _merge(self, updates: Updates, now: float, push_pull_from: str | None = None) -> None:
        for u in updates:
            st = u.state
            if st is State.ALIVE:
                self._on_alive(u, now)
            elif st is State.SUSPECT:
                self._on_suspect(u, now)
            elif st is State.DEAD and push_pull_from is not None and u.node != self.node_id:
                # memberlist: a remote 'dead' in full state only makes us suspect
                m = self._members.get(u.node)
                if m is not None and m.state is State.ALIVE and u.incarnation >= m.incarnation:
                    self._on_suspect(
                        Update(u.node, m.addr, u.incarnation, State.SUSPECT, push_pull_from), now
                    )
            else:
                self._on_dead(u, now)

    def _on_alive(self, u: Update, now: float) -> None:
        if u.node == self.node_id:
            if u.addr != self.addr and len(self._claims) < _MAX_CLAIMS:
                self._claims.add(u.addr)
            if u.incarnation > self.incarnation or (
                u.incarnation == self.incarnation and u.addr != self.addr
            ):
                self._refute(u.incarnation)
            return
        m = self._members.get(u.node)
        if m is None:
            self._members[u.node] = Member(u.node, u.addr, u.incarnation, State.ALIVE, now)
            self._live_cache = None
            self._insert_probe(u.node)
            self._emit(EventKind.JOINED, u.node, u.addr, u.incarnation, now)
            self._broadcast(u)
            return
        if u.incarnation <= m.incarnation:
            return
        prev = m.state
        m.incarnation, m.addr, m.state, m.since = u.incarnation, u.addr, State.ALIVE, now
        self._suspicions.pop(u.node, None)
        self._broadcast(u)
        if prev is State.SUSPECT:
            self._emit(EventKind.ALIVE, u.node, u.addr, u.incarnation, now)
        elif prev in (State.DEAD, State.LEFT):
            self._recent_dead.pop(u.node, None)
            self._live_cache = None
            self._insert_probe(u.node)
            self._emit(EventKind.JOINED, u.node, u.addr, u.incarnation, now)

    def take_claims(self) -> list[str]:
        """Other addresses heard claiming this node's id since the last call: a restart of
        this node at a new address (stale), or another agent with the same id. The shell
        dials them; the handshake tells the two apart."""
        claims, self._claims = sorted(self._claims), set()
        return claims

    def _on_suspect(self, u: Update, now: float) -> None:
        if u.node == self.node_id:
            if not self._leaving and u.incarnation >= self.incarnation:
                self._refute(u.incarnation)
            return
        m = self._members.get(u.node)
        if m is None or u.incarnation < m.incarnation:
            return
        if m.state is State.SUSPECT:
            s = self._suspicions.get(u.node)
            if s is not None and s.confirm(u.origin):
                self._broadcast(u)
            return
        if m.state is not State.ALIVE:
            return
        m.state, m.incarnation, m.since = State.SUSPECT, u.incarnation, now
        n = self.num_alive
        k = self.config.suspicion_confirmations
        if n - 2 < k:
            k = 0
        min_s = (
            self.config.suspicion_mult
            * max(1.0, math.log10(max(1, n)))
            * self.config.probe_interval_s
        )
        max_s = self.config.suspicion_max_timeout_mult * min_s
        self._suspicions[u.node] = _Suspicion(now, min_s, max_s, k, {u.origin})
        if u.origin != self.node_id and u.node != self._probe_target:
            # probe a fresh suspect next: our result confirms (or, via the buddy suspect
            # in the ping, gets refuted) within one probe interval instead of a round
            self._probe_order.insert(self._probe_index, u.node)
        self._emit(EventKind.SUSPECT, u.node, m.addr, u.incarnation, now)
        self._broadcast(u)

    def _on_dead(self, u: Update, now: float) -> None:
        if u.node == self.node_id:
            if not self._leaving and u.incarnation >= self.incarnation:
                self._refute(u.incarnation)
            return
        m = self._members.get(u.node)
        if m is None or u.incarnation < m.incarnation:
            return
        if m.state in (State.DEAD, State.LEFT):
            return
        left = u.state is State.LEFT
        m.state = State.LEFT if left else State.DEAD
        m.incarnation, m.since = u.incarnation, now
        self._suspicions.pop(u.node, None)
        self._live_cache = None
        self._recent_dead[u.node] = now + self.config.gossip_to_dead_s
        self._emit(EventKind.LEFT if left else EventKind.DEAD, u.node, m.addr, u.incarnation, now)
        self._broadcast(u)

    def _expire_suspicion(self, node: str, now: float) -> None:
        s = self._suspicions.pop(node)
        m = self._members.get(node)
        if m is None or m.state is not State.SUSPECT:
            return
        log.debug("%s: suspicion of %s expired after %.2fs", self.node_id, node, now - s.start)
        self._on_dead(Update(node, m.addr, m.incarnation, State.DEAD, self.node_id), now)

    def _refute(self, seen: int) -> None:
        self.incarnation = max(self.incarnation, seen) + 1
        self.stats.refutes += 1
        self._add_health(1)
        self._broadcast(self._self_update())

    def _reap(self, now: float) -> None:
        for node, until in list(self._recent_dead.items()):
            if until <= now:
                del self._recent_dead[node]
        horizon = now - self.config.dead_retention_s
        gone = [
            n
            for n, m in self._members.items()
            if m.state in (State.DEAD, State.LEFT) and m.since <= horizon
        ]
        if gone:
            self._states_cache = None
        for n in gone:
            del self._members[n]
            self._recent_dead.pop(n, None)

    # -- helpers -------------------------------------------------------------------------

    def _live(self) -> list[str]:
        if self._live_cache is None:
            self._live_cache = [
                n for n, m in self._members.items() if m.state in (State.ALIVE, State.SUSPECT)
            ]
        return self._live_cache

    def _insert_probe(self, node: str) -> None:
        # memberlist inserts new members at a random offset so they are probed soon
        pos = self._rng.randint(self._probe_index, len(self._probe_order))
        self._probe_order.insert(pos, node)

    def _self_update(self) -> Update:
        return Update(self.node_id, self.addr, self.incarnation, State.ALIVE, self.node_id)

    def _emit(self, kind: EventKind, node: str, addr: str, inc: int, now: float) -> None:
        if len(self._events) >= self.config.event_queue_limit:
            self._events.popleft()
            self.stats.events_dropped += 1
        self._events.append(MemberEvent(kind, node, addr, inc, now))


__all__ = ["EventKind", "Member", "MemberEvent", "Membership", "MembershipStats"]
