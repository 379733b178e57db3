"""Directory core: announcements, lookups, ring changes, repair and expiry."""

from __future__ import annotations

import random

import pytest

from meshkv.errors import ConfigError
from meshkv.mesh.config import DirectoryConfig
from meshkv.mesh.directory import Directory
from meshkv.mesh.messages import Announce, Handoff, Lookup, LookupReply, Outgoing
from meshkv.mesh.ring import Ring

CFG = DirectoryConfig(
    batch_max_keys=64, flush_interval_s=0.05, reannounce_interval_s=10.0, entry_ttl_s=25.0
)


class Mesh:
    """A few directory cores wired by a perfect (or lossy) in-memory network."""

    def __init__(self, names: list[str], cfg: DirectoryConfig = CFG) -> None:
        self.names = names
        self.dirs = {n: Directory(n, cfg, random.Random(n), 0.0) for n in names}
        self.now = 0.0
        self.drop_next = False
        self.sent: list[Outgoing] = []
        self.set_ring(names)

    def set_ring(self, members: list[str]) -> None:
        ring = Ring(members)
        for n in members:
            self.deliver(n, self.dirs[n].set_ring(ring, {m: f"{m}:1" for m in members}, self.now))

    def deliver(self, src: str, out: list[Outgoing]) -> None:
        self.sent.extend(out)
        for o in out:
            if self.drop_next:
                continue
            dst = o.to.split(":")[0]
            if dst in self.dirs:
                self.deliver(dst, self.dirs[dst].handle(f"{src}:1", o.msg, self.now))

    def run(self, until: float, members: list[str] | None = None) -> None:
        alive = members or self.names
        while True:
            t = min(self.dirs[n].next_deadline() for n in alive)
            if t > until:
                break
            self.now = max(self.now, t)
            for n in alive:
                if self.dirs[n].next_deadline() <= self.now:
                    self.deliver(n, self.dirs[n].tick(self.now))
        self.now = until

    def holders(self, key: bytes, members: list[str] | None = None) -> tuple[str, ...]:
        ring = Ring(members or self.names)
        return tuple(sorted(self.dirs[ring.owner(key)].holders_of(key, self.now)))


def keys(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(n)]


def test_adds_and_drops_reach_each_keys_home_in_bounded_batches() -> None:
    m = Mesh(["a", "b", "c"])
    ks = keys(300)
    m.dirs["a"].add_local(ks, 0.0)
    m.dirs["b"].add_local(ks[:10], 0.0)
    m.run(0.1)
    announces = [o.msg for o in m.sent if isinstance(o.msg, Announce)]
    assert announces and all(len(a.adds) + len(a.drops) <= 64 for a in announces)
    assert all(m.holders(k) == ("a", "b") for k in ks[:10])
    assert all(m.holders(k) == ("a",) for k in ks[10:])
    m.dirs["a"].drop_local(ks[:5], m.now)
    m.run(m.now + 0.1)
    assert all(m.holders(k) == ("b",) for k in ks[:5])


def test_plan_lookup_groups_per_home_and_lookup_message_answers() -> None:
    m = Mesh(["a", "b", "c", "d"])
    ks = keys(200)
    m.dirs["c"].add_local(ks, 0.0)
    m.run(0.1)
    plan = m.dirs["a"].plan_lookup(ks)
    assert sorted(k for group in plan.values() for k in group) == sorted(ks)
    ring = Ring(m.names)
    for home, group in plan.items():
        assert all(ring.owner(k) == home for k in group)
        (reply,) = m.dirs[home].handle("a:1", Lookup(7, "a", tuple(group)), m.now)
        assert reply.to == "a:1" and isinstance(reply.msg, LookupReply)
        assert reply.msg.seq == 7 and reply.msg.holders == tuple(("c",) for _ in group)


def test_ring_change_hands_off_entries_and_purges_departed_holders() -> None:
    m = Mesh(["a", "b", "c"])
    ks = keys(300)
    m.dirs["a"].add_local(ks, 0.0)
    m.dirs["c"].add_local(ks, 0.0)
    m.run(0.1)
    m.dirs["d"] = Directory("d", CFG, random.Random(1), m.now)
    m.names = ["a", "b", "c", "d"]
    m.sent.clear()
    m.set_ring(m.names)  # d joins: entries whose home is now d move there
    assert any(isinstance(o.msg, Handoff) for o in m.sent)
    assert all(m.holders(k) == ("a", "c") for k in ks)
    m.names = ["a", "b", "d"]
    m.set_ring(m.names)  # c died: its holder records are purged everywhere
    assert all(m.holders(k) == ("a",) for k in ks)


def test_lost_announcements_are_repaired_by_the_periodic_reannounce() -> None:
    m = Mesh(["a", "b", "c"])
    ks = keys(100)
    m.drop_next = True
    m.dirs["a"].add_local(ks, 0.0)
    m.run(0.1)
    m.drop_next = False
    missing = [k for k in ks if m.holders(k) != ("a",)]
    assert missing  # keys homed on b and c never heard of a
    m.run(CFG.reannounce_interval_s * 0.5)
    half = sum(1 for k in ks if m.holders(k) == ("a",))
    assert 0 < half < len(ks)  # spread over the period, not in one burst
    m.run(CFG.reannounce_interval_s * 1.05)
    assert all(m.holders(k) == ("a",) for k in ks)


def test_holders_that_stop_reannouncing_expire() -> None:
    m = Mesh(["a", "b"])
    ks = keys(20)
    m.dirs["a"].add_local(ks, 0.0)
    m.run(0.1)
    assert all(m.holders(k) == ("a",) for k in ks)
    m.run(CFG.entry_ttl_s * 1.5, members=["b"])  # a stops (e.g. hung): b forgets it
    homed_on_b = [k for k in ks if Ring(m.names).owner(k) == "b"]
    assert homed_on_b and all(m.holders(k) == () for k in homed_on_b)


def test_choose_holder_prefers_self_then_least_loaded() -> None:
    d = Directory("me", CFG, random.Random(3), 0.0)
    assert d.choose_holder(["x", "me", "y"]) == "me"
    assert d.choose_holder(["x", "y", "z"], load={"x": 3, "y": 1, "z": 2}) == "y"
    assert d.choose_holder(["x", "y"], exclude=["x"]) == "y"
    assert d.choose_holder(["x"], exclude=["x"]) is None
    picks = {d.choose_holder(["x", "y", "z"]) for _ in range(50)}
    assert picks == {"x", "y", "z"}  # random among equals


def test_bounds_and_bad_input() -> None:
    cfg = DirectoryConfig(pending_limit=10, max_entries=5, max_holders_per_key=2)
    d = Directory("a", cfg, random.Random(1), 0.0)
    d.add_local(keys(15), 0.0)
    assert d.stats.pending_dropped == 5
    ks = keys(8, seed=9)
    d.handle("b:1", Announce("b", tuple(ks)), 0.0)
    assert d.num_entries == 5 and d.stats.entries_evicted == 3
    for h in ("h1", "h2", "h3"):
        d.handle(f"{h}:1", Announce(h, (ks[-1],)), 1.0)
    assert len(d.holders_of(ks[-1], 1.0)) == 2
    with pytest.raises(ValueError, match="16 bytes"):
        d.add_local([b"x"], 0.0)
    with pytest.raises(LookupError, match="no ring"):
        d.plan_lookup(ks)
    with pytest.raises(ConfigError, match="entry_ttl_s"):
        DirectoryConfig(reannounce_interval_s=60, entry_ttl_s=30)
