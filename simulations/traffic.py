"""The mesh under real traffic: prefill saved, bytes moved, lookup load, against baselines.

One request stream (``simulations.workloads``) is served, request by request in virtual time,
by four designs side by side:

* ``mesh`` — every node runs the agent's **real** sans-IO ``Directory`` core over the
  **real** ``Ring``, and its CPU and SSD tiers keep chunks with the agent's **real** eviction
  policy (``meshkv.tiers.eviction``; CPU evictions are written back to SSD, SSD evictions
  drop the chunk and the directory is told). A request first takes the leading chunks its
  node holds, then asks the homes of the rest (``plan_lookup`` → the home's
  ``answer_lookup``), picks holders with ``choose_holder`` and pulls — when pulling a chunk
  is cheaper than computing it (``pull_s < prefill_s``). Announcements and the periodic
  re-announce run through the cores' own ``tick``; ring changes through ``set_ring`` (with
  its hand-off). Membership is not run message by message here (1,000 nodes × 1 hour of
  SWIM would dominate the run): a crash or partition changes the nodes' views after
  ``detect_s``, the detection time ``simulations.detection`` measures with the real core
  (p50 4.3 s, p99 8 s at 64 nodes).
* ``no_sharing`` — the same tiers, each node alone (vLLM's prefix cache, a per-node LMCache).
* ``central`` — the same tiers, and one directory service that knows every holder at once
  (a generous model of LMCache's controller or Mooncake's master: no announcement delay); every
  lookup of a chunk a node lacks goes to it. When it fails, nodes see only their own tiers.
* ``oracle_lru`` — one cache with the whole mesh's capacity (all CPU and SSD slots) that every
  request sees for free, LRU; ``oracle_belady`` the same cache with Belady's optimal eviction
  (offline, from the recorded trace).

Cost model (``CostModel``): prefill seconds per token, per-chunk bytes, link bandwidth and
round-trip time, SSD read bandwidth, lookup service time per message at a node and at the
central service, with M/M/1 queueing on the message rate each receives (an exponentially
weighted rate over ``rate_window_s``). A request's modelled TTFT is its lookup time (one
parallel round to the homes) + SSD reads + pulls + the prefill of what it computes; engine
queueing is not modelled (it would be the same for every design).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from meshkv.mesh.config import DirectoryConfig, RingConfig
from meshkv.mesh.directory import Directory
from meshkv.mesh.messages import Announce, Handoff, Outgoing
from meshkv.mesh.ring import Ring
from meshkv.tiers.eviction import make_policy
from simulations.sim import node_name, percentile
from simulations.workloads import CHUNK_TOKENS, Request

FLUSH_S = 0.05  # the agent's announcement flush interval (DirectoryConfig default)
KEY_WIRE_BYTES = 24  # a key and its framing in a lookup or announcement
MESSAGE_BYTES = 64  # header of a directory message


@dataclass(frozen=True, slots=True)
class CostModel:
    """What things cost. Defaults: Llama-3-8B in bf16 on one H100-class GPU, 100 Gb/s links."""

    chunk_bytes: int = CHUNK_TOKENS * 128 * 1024
    """KV bytes of one 256-token chunk (8B model: 32 layers x 8 KV heads x 128 x K,V x 2 B)."""
    prefill_s_per_token: float = 1 / 12_000
    """Prefill throughput of the engine (~12k tokens/s)."""
    link_bytes_per_s: float = 12.5e9
    """A node's network bandwidth for pulls (100 Gb/s)."""
    rtt_s: float = 100e-6
    """Round trip between two nodes in one data centre."""
    ssd_bytes_per_s: float = 3e9
    """Read bandwidth of a node's NVMe SSD."""
    node_lookup_service_s: float = 50e-6
    """Time one agent spends answering one lookup message (Python agent)."""
    central_lookup_service_s: float = 10e-6
    """Time the central service spends per message (given a 5x faster implementation)."""
    lookup_timeout_s: float = 0.25
    """A lookup to an unreachable home or service gives up after this (then: compute)."""
    rate_window_s: float = 10.0
    """Window of the message-rate estimate used for queueing."""

    def pull_s(self) -> float:
        return self.chunk_bytes / self.link_bytes_per_s

    def ssd_s(self) -> float:
        return self.chunk_bytes / self.ssd_bytes_per_s

    def prefill_chunk_s(self) -> float:
        return CHUNK_TOKENS * self.prefill_s_per_token


class Tier:
    """Fixed slots of one tier with the agent's eviction policy (key -> slot index)."""

    __slots__ = ("slot_of", "key_of", "free", "policy", "capacity")

    def __init__(self, capacity: int, policy: str) -> None:
        self.capacity = capacity
        self.slot_of: dict[bytes, int] = {}
        self.key_of: list[bytes | None] = [None] * capacity
        self.free = list(range(capacity - 1, -1, -1))
        self.policy = make_policy(policy, max(capacity, 1))

    def touch(self, key: bytes) -> bool:
        i = self.slot_of.get(key)
        if i is None:
            return False
        self.policy.touch(i)
        return True

    def put(self, key: bytes) -> bytes | None:
        """Insert ``key`` (or touch it); return the key evicted to make room, if any."""
        if self.capacity == 0:
            return key
        i = self.slot_of.get(key)
        if i is not None:
            self.policy.touch(i)
            return None
        evicted = None
        if not self.free:
            v = self.policy.victim()
            evicted = self.key_of[v]
            self.policy.remove(v, True)
            assert evicted is not None
            del self.slot_of[evicted]
            self.free.append(v)
        i = self.free.pop()
        self.slot_of[key] = i
        self.key_of[i] = key
        self.policy.insert(i, int.from_bytes(key[:8], "little"))
        return evicted


@dataclass(slots=True)
class NodeStore:
    """One node's CPU tier with its SSD tier below (write-back on CPU eviction)."""

    cpu: Tier
    ssd: Tier

    def tier_of(self, key: bytes) -> int:
        """1 = CPU, 2 = SSD (promoted to CPU by the caller), 0 = not held."""
        if key in self.cpu.slot_of:
            return 1
        if key in self.ssd.slot_of:
            return 2
        return 0

    def holds(self, key: bytes) -> bool:
        return key in self.cpu.slot_of or key in self.ssd.slot_of

    def put(self, key: bytes, dropped: list[bytes]) -> bool:
        """Make ``key`` CPU-resident; True if the node did not hold it before. Chunks that
        leave the node altogether are appended to ``dropped``."""
        new = not self.holds(key)
        ev = self.cpu.put(key)
        if ev is not None and ev != key:
            ev2 = self.ssd.put(ev)
            if ev2 is not None and ev2 not in self.cpu.slot_of:
                dropped.append(ev2)
        elif ev == key:  # no CPU tier: straight to SSD
            ev2 = self.ssd.put(key)
            if ev2 is not None and ev2 != key:
                dropped.append(ev2)
        if self.ssd.capacity:
            self.ssd.touch(key)
        return new


@dataclass(slots=True)
class Outcome:
    """How one request's prompt was served by one design."""

    cpu: int = 0
    ssd: int = 0
    peer: int = 0
    lookup_s: float = 0.0
    pulls_refused: int = 0  # peer-held chunks computed because pulling was slower
    stale: int = 0  # holders named by the directory that no longer held the chunk


@dataclass(slots=True)
class Totals:
    """Accumulated results of one design."""

    requests: int = 0
    prompt_tokens: int = 0
    cpu_tokens: int = 0
    ssd_tokens: int = 0
    peer_tokens: int = 0
    pull_bytes: int = 0
    directory_bytes: int = 0
    pulls_refused: int = 0
    stale: int = 0
    lookup_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    timeline: dict[int, list[int]] = field(default_factory=dict)  # minute -> [hit, prompt]

    def add(self, req: Request, o: Outcome, cost: CostModel, t: float) -> None:
        hit = (o.cpu + o.ssd + o.peer) * CHUNK_TOKENS
        self.requests += 1
        self.prompt_tokens += req.prompt_tokens
        self.cpu_tokens += o.cpu * CHUNK_TOKENS
        self.ssd_tokens += o.ssd * CHUNK_TOKENS
        self.peer_tokens += o.peer * CHUNK_TOKENS
        self.pull_bytes += o.peer * cost.chunk_bytes
        self.pulls_refused += o.pulls_refused
        self.stale += o.stale
        self.lookup_s.append(o.lookup_s)
        ttft = (
            o.lookup_s
            + o.ssd * cost.ssd_s()
            + o.peer * cost.pull_s()
            + (req.prompt_tokens - hit) * cost.prefill_s_per_token
        )
        self.ttft_s.append(ttft)
        m = self.timeline.setdefault(int(t // 60), [0, 0])
        m[0] += hit
        m[1] += req.prompt_tokens

    def summary(self, loads: list[float] | None, extra_load: float | None = None) -> dict[str, Any]:
        hit = self.cpu_tokens + self.ssd_tokens + self.peer_tokens
        saved = max(hit, 1)
        out: dict[str, Any] = {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "token_hit_rate": round(hit / max(self.prompt_tokens, 1), 4),
            "hit_rate_by_tier": {
                "cpu": round(self.cpu_tokens / max(self.prompt_tokens, 1), 4),
                "ssd": round(self.ssd_tokens / max(self.prompt_tokens, 1), 4),
                "peer": round(self.peer_tokens / max(self.prompt_tokens, 1), 4),
            },
            "prefill_tokens_saved": hit,
            "bytes_moved": self.pull_bytes + self.directory_bytes,
            "bytes_per_saved_token": round((self.pull_bytes + self.directory_bytes) / saved, 1),
            "pulls_refused_as_slower": self.pulls_refused,
            "stale_holders": self.stale,
            "lookup_s_p50": _r(percentile(self.lookup_s, 50)),
            "lookup_s_p99": _r(percentile(self.lookup_s, 99)),
            "ttft_s_p50": _r(percentile(self.ttft_s, 50)),
            "ttft_s_p99": _r(percentile(self.ttft_s, 99)),
            "timeline": {
                str(k): round(v[0] / max(v[1], 1), 4) for k, v in sorted(self.timeline.items())
            },
        }
        if loads is not None:
            mean = sum(loads) / max(len(loads), 1)
            top = max([*loads, extra_load or 0.0])
            out["hottest_node_load"] = round(top / mean, 3) if mean else 0.0
        return out


def _r(x: float) -> float:
    return x if math.isnan(x) else round(x, 6)


class _Rate:
    """Exponentially weighted message rate of one receiver (for M/M/1 queueing)."""

    __slots__ = ("rate", "t", "tau")

    def __init__(self, tau: float) -> None:
        self.rate, self.t, self.tau = 0.0, 0.0, tau

    def hit(self, now: float, n: float = 1.0) -> float:
        self.rate = self.rate * math.exp(-(now - self.t) / self.tau) + n / self.tau
        self.t = now
        return self.rate


def _queued(service_s: float, rate: float) -> float:
    rho = min(rate * service_s, 0.99)
    return service_s / (1.0 - rho)


@dataclass(slots=True)
class MeshNode:
    name: str
    store: NodeStore
    directory: Directory
    alive: bool = True
    group: int = 0
    lookups: float = 0.0  # lookup messages received
    announces: float = 0.0  # announcement / hand-off messages received
    served: float = 0.0  # chunks pulled from this node
    rate: _Rate = field(default_factory=lambda: _Rate(10.0))


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Per-node capacity and the mesh's knobs."""

    cpu_chunks: int = 32
    """CPU-tier slots per node. With ``sessions_per_node_hour`` = 40 this is the same
    pressure as 8,000 slots (256 GiB of 32 MiB chunks) at 10,000 sessions an hour: what
    matters is slots per session-hour, and here the tiers hold a fraction of the hour's
    working set, so eviction decides what is left to share."""
    ssd_chunks: int = 96
    """SSD-tier slots per node (3x the CPU tier)."""
    policy: str = "lru"
    """The tiers' eviction policy (the agent's ``lru`` or ``s3fifo``)."""
    tick_s: float = 1.0
    """How often every node's directory core is ticked for the re-announce sweep and expiry
    (announcements are flushed 50 ms after they are queued, as in the agent)."""
    reannounce_s: float = 600.0
    """The directory's re-announce period (the agent's default is 60 s; 1,000 nodes re-announce
    a few million keys per period, so large runs use a longer one)."""
    detect_s: float = 5.0
    """Time until the others' views drop a crashed node (SWIM detection, see the docstring)."""
    join_s: float = 2.0
    """Time until a started or healed node is in everyone's view."""
    belady: bool = True
    """Also run the offline Belady oracle (keeps the whole trace in memory)."""


class Cluster:
    """All designs over one set of nodes; ``serve(request, node)`` feeds each of them."""

    def __init__(self, n: int, config: ClusterConfig, cost: CostModel, seed: int) -> None:
        self.config = config
        self.cost = cost
        self.seed = seed
        self.now = 0.0
        self.names = [node_name(i) for i in range(n)]
        dcfg = DirectoryConfig(
            flush_interval_s=FLUSH_S,
            reannounce_interval_s=config.reannounce_s,
            entry_ttl_s=2.5 * config.reannounce_s,
        )
        self._dcfg = dcfg
        self.ring_config = RingConfig()
        ring = Ring(self.names, self.ring_config)
        self.views: dict[int, Ring] = {0: ring}
        self.mesh: dict[str, MeshNode] = {}
        for name in self.names:
            self.mesh[name] = self._new_mesh_node(name)
        for node in self.mesh.values():
            node.directory.set_ring(ring, {m: m for m in ring.members}, 0.0)
        self.central_holders: dict[bytes, set[str]] = {}
        self.central_up = True
        self.central_msgs = 0.0
        self.central_rate = _Rate(cost.rate_window_s)
        self.oracle_capacity = n * (config.cpu_chunks + config.ssd_chunks)
        # one LRU over every slot of the mesh; an OrderedDict is the same policy in C
        self.oracle: OrderedDict[bytes, None] = OrderedDict()
        self.trace: list[tuple[tuple[bytes, ...], int, int]] | None = [] if config.belady else None
        self.central_served = {name: 0.0 for name in self.names}
        self.totals = {d: Totals() for d in ("mesh", "no_sharing", "central", "oracle_lru")}
        self._next_tick = config.tick_s
        self._flushes: list[tuple[float, str]] = []  # (due, node): announcements to send
        self._flush_due: dict[str, float] = {}
        self._rng = random.Random(f"cluster/{seed}")

    def _store(self) -> NodeStore:
        c = self.config
        return NodeStore(Tier(c.cpu_chunks, c.policy), Tier(c.ssd_chunks, c.policy))

    def _new_mesh_node(self, name: str) -> MeshNode:
        drng = random.Random(f"dir/{self.seed}/{name}/{self.now}")
        node = MeshNode(name, self._store(), Directory(name, self._dcfg, drng, self.now))
        node.rate = _Rate(self.cost.rate_window_s)
        return node

    # -- time ----------------------------------------------------------------------------

    def advance(self, t: float) -> None:
        """Run the directory cores up to time ``t``: a node with queued adds or drops is
        ticked when its flush falls due (the agent's 50 ms), every node once per ``tick_s``
        for the re-announce sweep and expiry."""
        while True:
            flush = self._flushes[0][0] if self._flushes else math.inf
            if min(flush, self._next_tick) > t:
                break
            if flush <= self._next_tick:
                due, name = heapq.heappop(self._flushes)
                self._flush_due.pop(name, None)
                node = self.mesh[name]
                self.now = due
                if node.alive:
                    self._deliver(node, node.directory.tick(due))
                continue
            self.now = self._next_tick
            for node in self.mesh.values():
                if node.alive:
                    self._deliver(node, node.directory.tick(self.now))
            self._next_tick += self.config.tick_s
        self.now = t

    def _changed(self, node: MeshNode) -> None:
        """``node`` queued announcements: tick it when its flush interval has passed."""
        if node.name not in self._flush_due:
            due = self.now + FLUSH_S + 1e-9
            self._flush_due[node.name] = due
            heapq.heappush(self._flushes, (due, node.name))

    def _deliver(self, src: MeshNode, out: Iterable[Outgoing]) -> None:
        for o in out:
            dst = self.mesh.get(o.to)
            msg = o.msg
            keys = len(msg.adds) + len(msg.drops) if isinstance(msg, Announce) else 0
            if isinstance(msg, Handoff):
                keys = len(msg.entries)
            self.totals["mesh"].directory_bytes += MESSAGE_BYTES + KEY_WIRE_BYTES * keys
            if dst is None or not dst.alive or dst.group != src.group:
                continue
            dst.announces += 1
            dst.directory.handle(src.name, msg, self.now)

    # -- serving -------------------------------------------------------------------------

    def serve(self, req: Request, node: str) -> None:
        """Serve ``req`` on ``node`` by every design. The three node-level designs put the
        same chunks into the same node in the same order (every chunk of every prompt a node
        serves, computed or pulled), so their tiers are always equal: one store per node
        serves all three, and they differ only in how they find what the node lacks."""
        self.advance(req.time)
        usable = max(0, min(len(req.keys), (req.prompt_tokens - 1) // CHUNK_TOKENS))
        keys = req.keys
        cost, t = self.cost, req.time
        me = self.mesh[node]
        local = Outcome()
        i = self._local_prefix(me.store, keys, usable, local)
        mesh = self._mesh_remote(me, keys, i, usable, Outcome(local.cpu, local.ssd))
        central = self._central_remote(me, keys, i, usable, Outcome(local.cpu, local.ssd))
        added, dropped = self._store_all(me.store, keys)
        me.directory.add_local(added, self.now)
        me.directory.drop_local(dropped, self.now)
        if added or dropped:
            self._changed(me)
        self._central_update(node, added, dropped)
        self.totals["mesh"].add(req, mesh, cost, t)
        self.totals["no_sharing"].add(req, local, cost, t)
        self.totals["central"].add(req, central, cost, t)
        o = Outcome()
        oracle = self.oracle
        for k in keys[:usable]:
            if k not in oracle:
                break
            o.cpu += 1
        for k in keys:
            oracle[k] = None
            oracle.move_to_end(k)
        while len(oracle) > self.oracle_capacity:
            oracle.popitem(last=False)
        self.totals["oracle_lru"].add(req, o, cost, t)
        if self.trace is not None:
            self.trace.append((keys, usable, req.prompt_tokens))

    def _local_prefix(
        self, store: NodeStore, keys: tuple[bytes, ...], usable: int, o: Outcome
    ) -> int:
        i = 0
        while i < usable:
            tier = store.tier_of(keys[i])
            if tier == 0:
                break
            if tier == 1:
                o.cpu += 1
            else:
                o.ssd += 1
            i += 1
        return i

    def _store_all(
        self, store: NodeStore, keys: Iterable[bytes]
    ) -> tuple[list[bytes], list[bytes]]:
        added: list[bytes] = []
        dropped: list[bytes] = []
        for k in keys:
            if store.put(k, dropped):
                added.append(k)
        return added, dropped

    def _pull_pays(self) -> bool:
        return self.cost.pull_s() < self.cost.prefill_chunk_s()

    def _mesh_remote(
        self, me: MeshNode, keys: tuple[bytes, ...], i: int, usable: int, o: Outcome
    ) -> Outcome:
        """The mesh: ask the homes of the chunks this node lacks, pull from holders."""
        if i >= usable:
            return o
        cost = self.cost
        rest = list(keys[i:usable])
        answers: dict[bytes, tuple[str, ...]] = {}
        worst = 0.0
        for home, ks in me.directory.plan_lookup(rest).items():
            h = self.mesh[home]
            if home == me.name:
                got = me.directory.answer_lookup(ks, self.now)
            elif not h.alive or h.group != me.group:
                worst = max(worst, cost.lookup_timeout_s)
                continue
            else:
                h.lookups += 1
                rate = h.rate.hit(self.now)
                worst = max(worst, cost.rtt_s + _queued(cost.node_lookup_service_s, rate))
                got = h.directory.answer_lookup(ks, self.now)
                self.totals["mesh"].directory_bytes += 2 * MESSAGE_BYTES + KEY_WIRE_BYTES * len(ks)
            answers.update(zip(ks, got, strict=True))
        o.lookup_s = worst
        pays = self._pull_pays()
        for k in rest:
            src = self._holder(me, k, answers.get(k, ()), o)
            if src is None:
                break
            if not pays:
                o.pulls_refused += 1
                break
            src.served += 1
            o.peer += 1
            # serving reads the chunk on the holder, as the agent's read does: it counts as a
            # use there (and a chunk on the holder's SSD is promoted to serve it)
            dropped: list[bytes] = []
            src.store.put(k, dropped)
            if dropped:
                src.directory.drop_local(dropped, self.now)
                self._changed(src)
                self._central_update(src.name, [], dropped)  # the central map hears of it too
        return o

    def _holder(
        self, me: MeshNode, key: bytes, holders: tuple[str, ...], o: Outcome
    ) -> MeshNode | None:
        tried: list[str] = []
        while True:
            pick = me.directory.choose_holder(holders, None, tried)
            if pick is None:
                return None
            tried.append(pick)
            h = self.mesh.get(pick)
            if h is None or not h.alive or h.group != me.group or pick == me.name:
                continue
            if h.store.holds(key):
                return h
            o.stale += 1

    def _central_remote(
        self, me: MeshNode, keys: tuple[bytes, ...], i: int, usable: int, o: Outcome
    ) -> Outcome:
        """The central directory: one request to the service, which knows every holder. It
        stands in partition group 0: nodes cut off from it see only their own tiers."""
        if i >= usable:
            return o
        cost = self.cost
        if not self.central_up or me.group != 0:
            o.lookup_s = cost.lookup_timeout_s
            return o
        self.central_msgs += 1
        rate = self.central_rate.hit(self.now)
        o.lookup_s = cost.rtt_s + _queued(cost.central_lookup_service_s, rate)
        self.totals["central"].directory_bytes += 2 * MESSAGE_BYTES + KEY_WIRE_BYTES * (usable - i)
        pays = self._pull_pays()
        for k in keys[i:usable]:
            holders = [
                h
                for h in self.central_holders.get(k, ())
                if self.mesh[h].alive
                and self.mesh[h].group == me.group
                and self.mesh[h].store.holds(k)
            ]
            if not holders:
                break
            if not pays:
                o.pulls_refused += 1
                break
            o.peer += 1
            self.central_served[self._rng.choice(sorted(holders))] += 1
        return o

    def _central_update(self, name: str, added: list[bytes], dropped: list[bytes]) -> None:
        if not added and not dropped:
            return
        if self.central_up:
            self.central_msgs += 1  # one batched admit/evict report per request
            self.central_rate.hit(self.now)
            n = len(added) + len(dropped)
            self.totals["central"].directory_bytes += MESSAGE_BYTES + KEY_WIRE_BYTES * n
        for k in added:
            self.central_holders.setdefault(k, set()).add(name)
        for k in dropped:
            hs = self.central_holders.get(k)
            if hs is not None:
                hs.discard(name)
                if not hs:
                    del self.central_holders[k]

    # -- faults --------------------------------------------------------------------------

    def crash(self, names: Iterable[str]) -> None:
        """Nodes lose power: their tiers are gone; the others notice after ``detect_s``."""
        down = [n for n in names if self.mesh[n].alive]
        for n in down:
            self.mesh[n].alive = False
            st = self.mesh[n].store
            for k in list(st.cpu.slot_of) + list(st.ssd.slot_of):
                hs = self.central_holders.get(k)
                if hs is not None:
                    hs.discard(n)
                    if not hs:
                        del self.central_holders[k]

    def restart(self, name: str) -> None:
        """A crashed node comes back empty (a fresh agent, incarnation 0)."""
        node = self._new_mesh_node(name)
        node.group = 0
        # like a starting agent: a ring of itself until membership tells it more
        node.directory.set_ring(Ring([name], self.ring_config), {name: name}, self.now)
        self.mesh[name] = node

    def update_views(self) -> None:
        """Every alive node's view becomes the alive members of its group; rings and
        directories follow (``set_ring``, with the core's hand-off and purge)."""
        groups: dict[int, list[str]] = {}
        for n, node in self.mesh.items():
            if node.alive:
                groups.setdefault(node.group, []).append(n)
        for g, members in groups.items():
            old = self.views.get(g) or self.views.get(0) or Ring([], self.ring_config)
            ring = old.derive(members)
            self.views[g] = ring
            addrs = {m: m for m in ring.members}
            for m in members:
                node = self.mesh[m]
                self._deliver(node, node.directory.set_ring(ring, addrs, self.now))

    def partition(self, halves: int = 2) -> None:
        for i, n in enumerate(self.names):
            self.mesh[n].group = i % halves

    def heal(self) -> None:
        for n in self.names:
            self.mesh[n].group = 0

    # -- results -------------------------------------------------------------------------

    def results(self) -> dict[str, Any]:
        alive = [n for n in self.names]
        mesh_loads = [self.mesh[n].lookups + self.mesh[n].served for n in alive]
        dir_loads = [self.mesh[n].lookups + self.mesh[n].announces for n in alive]
        served = self.central_served
        central_loads = [served[n] for n in alive]
        out = {
            "mesh": self.totals["mesh"].summary(mesh_loads),
            "no_sharing": self.totals["no_sharing"].summary(None),
            "central": self.totals["central"].summary(central_loads, self.central_msgs),
            "oracle_lru": self.totals["oracle_lru"].summary(None),
        }
        mean_dir = sum(dir_loads) / max(len(dir_loads), 1)
        out["mesh"]["hottest_directory_load"] = (
            round(max(dir_loads) / mean_dir, 3) if mean_dir else 0.0
        )
        out["mesh"]["directory_messages_per_node_mean"] = round(mean_dir, 1)
        out["central"]["central_messages"] = int(self.central_msgs)
        out["central"]["central_over_mean_node_directory"] = (
            round(self.central_msgs / mean_dir, 1) if mean_dir else 0.0
        )
        if self.trace is not None:
            out["oracle_belady"] = belady(self.trace, self.oracle_capacity)
        return out


def belady(trace: list[tuple[tuple[bytes, ...], int, int]], capacity: int) -> dict[str, Any]:
    """Token hit rate of one cache of ``capacity`` chunks with Belady's optimal eviction
    (evict the chunk next used furthest in the future; a chunk needed later than everything
    cached is not admitted), counted like every other design: the leading usable chunks of
    each prompt that are cached, over all prompt tokens. ``trace``: (keys, usable, tokens)."""
    flat = [k for keys, _, _ in trace for k in keys]
    nxt = [0] * len(flat)
    last: dict[bytes, int] = {}
    never = 1 << 62
    for i in range(len(flat) - 1, -1, -1):
        nxt[i] = last.get(flat[i], never)
        last[flat[i]] = i
    cached: dict[bytes, int] = {}  # key -> its next use
    heap: list[tuple[int, bytes]] = []  # (-next use, key); stale entries skipped
    hit_chunks = prompt_tokens = 0
    pos = 0
    for keys, usable, tokens in trace:
        prompt_tokens += tokens
        prefix = True
        for j, k in enumerate(keys):
            if prefix and j < usable and k in cached:
                hit_chunks += 1
            else:
                prefix = False
            n = nxt[pos]
            pos += 1
            if k not in cached and len(cached) >= capacity:
                while -heap[0][0] != cached.get(heap[0][1]):
                    heapq.heappop(heap)
                if -heap[0][0] < n:
                    continue  # bypass: k is needed later than anything cached
                del cached[heapq.heappop(heap)[1]]
            cached[k] = n
            heapq.heappush(heap, (-n, k))
    return {"token_hit_rate": round(hit_chunks * CHUNK_TOKENS / max(prompt_tokens, 1), 4)}
