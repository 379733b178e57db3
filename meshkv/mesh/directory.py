"""Which nodes hold which keys: the directory kept at each key's home node (sans-IO).

Two roles in one core:

* **holder** — ``add_local``/``drop_local`` queue adds and drops; ``tick`` sends them in
  bounded batches (``Announce``) to each key's home. Every held key is re-announced once
  per ``reannounce_interval_s``, spread evenly over the period, which repairs lost messages
  and homes that restarted. When the ring changes, keys whose home moved are announced to
  the new home at once.
* **home** — ``handle(Announce)`` records holders with an expiry (``entry_ttl_s``: a holder
  that stops re-announcing is forgotten), ``answer_lookup`` returns holders per key, and on
  a ring change entries whose home moved are handed to the new home (``Handoff``) and
  holders that left the ring are purged.

``plan_lookup(keys)`` groups a prompt's keys per home, so a lookup costs one request per
home; ``choose_holder`` picks where to pull from (self first, then least loaded, then
random). Like the membership core, this never touches sockets, clocks or global random.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from meshkv.mesh.config import DirectoryConfig
from meshkv.mesh.messages import (
    Announce,
    Handoff,
    Lookup,
    LookupReply,
    Message,
    Outgoing,
)
from meshkv.mesh.ring import KEY_LEN, Ring

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DirectoryStats:
    """Counters for metrics."""

    announced: int = 0
    pending_dropped: int = 0
    entries_evicted: int = 0
    holders_expired: int = 0
    holders_purged: int = 0
    handed_off: int = 0
    messages_ignored: int = 0
    unknown_home: int = 0


class Directory:
    """Holder and home side of the key -> holders directory of one node."""

    def __init__(
        self, node_id: str, config: DirectoryConfig, rng: random.Random, now: float
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.stats = DirectoryStats()
        self._rng = rng
        self._ring: Ring | None = None
        self._addrs: dict[str, str] = {}
        # holder side
        self._held: dict[bytes, None] = {}  # insertion-ordered set
        self._pending: dict[bytes, bool] = {}  # key -> True (add) / False (drop)
        self._next_flush = math.inf
        self._sweep: list[bytes] = []
        self._sweep_pos = 0
        self._sweep_start = now
        self._last_sweep = now
        # home side: key -> {holder: expires_at}
        self._entries: dict[bytes, dict[str, float]] = {}
        self._next_expire = now + config.entry_ttl_s / 4

    # -- holder side ---------------------------------------------------------------------

    def add_local(self, keys: Iterable[bytes], now: float) -> None:
        """This node now holds ``keys``: queue announcements to their homes."""
        for k in keys:
            _check_key(k)
            if k not in self._held:
                self._held[k] = None
                self._queue(k, True, now)

    def drop_local(self, keys: Iterable[bytes], now: float) -> None:
        """This node no longer holds ``keys``: queue drops to their homes."""
        for k in keys:
            if k in self._held:
                del self._held[k]
                self._queue(k, False, now)

    def held(self) -> int:
        """Number of keys this node holds."""
        return len(self._held)

    def _queue(self, key: bytes, add: bool, now: float) -> None:
        if key not in self._pending and len(self._pending) >= self.config.pending_limit:
            self.stats.pending_dropped += 1  # the periodic re-announce repairs it
            return
        self._pending[key] = add
        if self._next_flush == math.inf:
            self._next_flush = now + self.config.flush_interval_s

    # -- ring changes --------------------------------------------------------------------

    def set_ring(self, ring: Ring, addresses: Mapping[str, str], now: float) -> list[Outgoing]:
        """Adopt a new ring (after a membership change). ``addresses`` maps member ids to
        addresses. Hands off entries whose home moved, purges holders no longer in the ring
        and announces held keys whose home moved."""
        old = self._ring
        self._ring = ring
        self._addrs = dict(addresses)
        out: list[Outgoing] = []
        members = set(ring.members)
        # home side: purge departed holders, hand off entries whose home moved
        if self._entries:
            for key in list(self._entries):
                holders = self._entries[key]
                gone = [h for h in holders if h not in members]
                for h in gone:
                    del holders[h]
                self.stats.holders_purged += len(gone)
                if not holders:
                    del self._entries[key]
            if self._entries and len(ring):
                out.extend(self._handoff(ring, now))
        # holder side: announce keys whose home moved (old home may be gone with its entries)
        if self._held and len(ring):
            keys = list(self._held)
            new_home = ring.owner_indices(keys)
            if old is not None and len(old):
                old_names = np.array(old.members, dtype=object)[old.owner_indices(keys)]
                new_names = np.array(ring.members, dtype=object)[new_home]
                moved = [k for k, a, b in zip(keys, old_names, new_names, strict=True) if a != b]
            else:
                moved = keys
            out.extend(self._announce(moved, (), now))
        return out

    def _handoff(self, ring: Ring, now: float) -> list[Outgoing]:
        keys = list(self._entries)
        homes = ring.owner_indices(keys)
        me = self.node_id
        groups: dict[str, list[tuple[bytes, tuple[str, ...]]]] = {}
        for k, hi in zip(keys, homes.tolist(), strict=True):
            home = ring.members[hi]
            if home == me:
                continue
            groups.setdefault(home, []).append((k, tuple(self._entries.pop(k))))
        out: list[Outgoing] = []
        for home, entries in groups.items():
            addr = self._addrs.get(home)
            if addr is None:
                self.stats.unknown_home += 1
                continue
            self.stats.handed_off += len(entries)
            step = self.config.handoff_batch
            for i in range(0, len(entries), step):
                out.append(Outgoing(addr, Handoff(me, tuple(entries[i : i + step]))))
        return out

    # -- lookups -------------------------------------------------------------------------

    def plan_lookup(self, keys: Sequence[bytes]) -> dict[str, list[bytes]]:
        """Group ``keys`` by home node (order kept within each group)."""
        ring = self._need_ring()
        plan: dict[str, list[bytes]] = {}
        if not keys:
            return plan
        for k, hi in zip(keys, ring.owner_indices(keys).tolist(), strict=True):
            plan.setdefault(ring.members[hi], []).append(k)
        return plan

    def answer_lookup(self, keys: Sequence[bytes], now: float) -> list[tuple[str, ...]]:
        """Home side: the known (unexpired) holders of each key, in order."""
        out: list[tuple[str, ...]] = []
        for k in keys:
            holders = self._entries.get(k)
            if not holders:
                out.append(())
            else:
                out.append(tuple(h for h, exp in holders.items() if exp > now))
        return out

    def choose_holder(
        self,
        holders: Collection[str],
        load: Mapping[str, float] | None = None,
        exclude: Collection[str] = (),
    ) -> str | None:
        """Where to pull from: this node if it holds the key, else the least loaded holder
        (``load``: lower is better; unknown counts as 0), ties broken at random. ``exclude``
        skips holders that already failed. None when no holder is left."""
        cands = [h for h in holders if h not in exclude]
        if not cands:
            return None
        if self.node_id in cands:
            return self.node_id
        if load:
            best = min(load.get(h, 0.0) for h in cands)
            cands = [h for h in cands if load.get(h, 0.0) == best]
        return cands[0] if len(cands) == 1 else self._rng.choice(sorted(cands))

    def holders_of(self, key: bytes, now: float) -> tuple[str, ...]:
        """Home side: the holders of one key."""
        return self.answer_lookup([key], now)[0]

    @property
    def num_entries(self) -> int:
        """Keys this node is (or recently was) home of."""
        return len(self._entries)

    # -- driving -------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """Earliest time ``tick`` has work to do."""
        t = min(self._next_flush, self._next_expire)
        if self._held:
            if self._sweep_pos < len(self._sweep):
                # time at which the next key of the spread-out re-announce falls due
                frac = (self._sweep_pos + 1) / len(self._sweep)
                due = self._sweep_start + frac * self.config.reannounce_interval_s
                # batch the sweep: at most one step per flush interval
                t = min(t, max(due, self._last_sweep + self.config.flush_interval_s))
            elif self._sweep:
                t = min(t, self._sweep_start + self.config.reannounce_interval_s)
            else:
                t = min(t, self._last_sweep + self.config.flush_interval_s)
        return t

    def tick(self, now: float) -> list[Outgoing]:
        """Flush queued adds/drops, advance the re-announce sweep, expire stale holders."""
        out: list[Outgoing] = []
        if now >= self._next_flush and self._pending:
            adds = [k for k, a in self._pending.items() if a]
            drops = [k for k, a in self._pending.items() if not a]
            self._pending.clear()
            out.extend(self._announce(adds, drops, now))
        if now >= self._next_flush:
            self._next_flush = math.inf
        if self._held:
            out.extend(self._reannounce(now))
        if now >= self._next_expire:
            self._next_expire = now + self.config.entry_ttl_s / 4
            self._expire(now)
        return out

    def handle(self, src: str, msg: Message, now: float) -> list[Outgoing]:
        """Process one directory message from address ``src``."""
        if isinstance(msg, Announce):
            self._record(msg.sender, msg.adds, msg.drops, now)
        elif isinstance(msg, Handoff):
            for key, holders in msg.entries:
                self._record_many(key, holders, now)
        elif isinstance(msg, Lookup):
            reply = LookupReply(msg.seq, self.node_id, tuple(self.answer_lookup(msg.keys, now)))
            return [Outgoing(src, reply)]
        else:
            self.stats.messages_ignored += 1
        return []

    # -- internals -----------------------------------------------------------------------

    def _need_ring(self) -> Ring:
        if self._ring is None or not len(self._ring):
            raise LookupError("directory: no ring yet")
        return self._ring

    def _announce(
        self, adds: Sequence[bytes], drops: Sequence[bytes], now: float
    ) -> list[Outgoing]:
        if (not adds and not drops) or self._ring is None or not len(self._ring):
            return []
        by_home: dict[str, tuple[list[bytes], list[bytes]]] = {}
        for keys, slot in ((adds, 0), (drops, 1)):
            if keys:
                for home, ks in self.plan_lookup(keys).items():
                    by_home.setdefault(home, ([], []))[slot].extend(ks)
        out: list[Outgoing] = []
        step = self.config.batch_max_keys
        for home, (a, d) in by_home.items():
            self.stats.announced += len(a) + len(d)
            if home == self.node_id:
                self._record(home, a, d, now)
                continue
            addr = self._addrs.get(home)
            if addr is None:
                self.stats.unknown_home += 1
                continue
            both = [(k, True) for k in a] + [(k, False) for k in d]
            for i in range(0, len(both), step):
                part = both[i : i + step]
                msg = Announce(
                    self.node_id,
                    tuple(k for k, add in part if add),
                    tuple(k for k, add in part if not add),
                )
                out.append(Outgoing(addr, msg))
        return out

    def _reannounce(self, now: float) -> list[Outgoing]:
        period = self.config.reannounce_interval_s
        done = self._sweep_pos >= len(self._sweep)
        if done and (now >= self._sweep_start + period or not self._sweep):
            self._sweep = list(self._held)
            self._sweep_pos = 0
            self._sweep_start = now
        if not self._sweep:
            return []
        frac = min(1.0, (now - self._sweep_start) / period)
        self._last_sweep = now
        due = min(len(self._sweep), math.floor(frac * len(self._sweep) + 1e-9))
        if due <= self._sweep_pos:
            return []
        batch = [k for k in self._sweep[self._sweep_pos : due] if k in self._held]
        self._sweep_pos = due
        return self._announce(batch, (), now)

    def _record(
        self, holder: str, adds: Iterable[bytes], drops: Iterable[bytes], now: float
    ) -> None:
        exp = now + self.config.entry_ttl_s
        for k in adds:
            self._put(k, holder, exp)
        for k in drops:
            holders = self._entries.get(k)
            if holders is not None:
                holders.pop(holder, None)
                if not holders:
                    del self._entries[k]

    def _record_many(self, key: bytes, holders: Iterable[str], now: float) -> None:
        exp = now + self.config.entry_ttl_s
        for h in holders:
            self._put(key, h, exp)

    def _put(self, key: bytes, holder: str, exp: float) -> None:
        holders = self._entries.get(key)
        if holders is None:
            if len(self._entries) >= self.config.max_entries:
                del self._entries[next(iter(self._entries))]
                self.stats.entries_evicted += 1
            holders = self._entries[key] = {}
        elif holder not in holders and len(holders) >= self.config.max_holders_per_key:
            del holders[min(holders, key=holders.__getitem__)]
        holders[holder] = exp

    def _expire(self, now: float) -> None:
        for key in list(self._entries):
            holders = self._entries[key]
            stale = [h for h, exp in holders.items() if exp <= now]
            for h in stale:
                del holders[h]
            self.stats.holders_expired += len(stale)
            if not holders:
                del self._entries[key]


def _check_key(k: bytes) -> None:
    if not isinstance(k, bytes) or len(k) != KEY_LEN:
        raise ValueError(f"directory: chunk keys must be {KEY_LEN} bytes")
