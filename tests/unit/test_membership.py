"""Membership core (SWIM + Lifeguard) driven by hand and through the in-memory simulator."""

from __future__ import annotations

import math
import random

import msgpack
import pytest

from meshkv.errors import ConfigError, ProtocolError
from meshkv.mesh.config import MembershipConfig
from meshkv.mesh.membership import EventKind, Membership
from meshkv.mesh.messages import (
    Ack,
    Announce,
    Gossip,
    Handoff,
    Lookup,
    LookupReply,
    Nack,
    Ping,
    PingReq,
    PushPull,
    State,
    Update,
    decode,
)
from simulations.sim import Sim, run_until_converged, start_cluster

LAN = MembershipConfig.LAN()
KEY = bytes(range(16))


def core(node: str = "a", now: float = 0.0, **cfg: object) -> Membership:
    config = LAN.with_(**cfg) if cfg else LAN
    return Membership(node, f"{node}:1", config, random.Random(7), now)


def alive(node: str, inc: int = 0) -> Update:
    return Update(node, f"{node}:1", inc, State.ALIVE, node)


def with_members(m: Membership, names: list[str], now: float = 0.0) -> None:
    m.handle("x:1", Gossip("x", tuple(alive(n) for n in names)), now)
    m.drain_events()


# -- messages and config ------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        Ping(1, "a", "b", (alive("c", 3),)),
        Ack(2, "b", (Update("d", "d:1", 4, State.SUSPECT, "a"),)),
        PingReq(3, "a", "b", "b:1", ()),
        Nack(4, "c"),
        Gossip("a", (Update("e", "e:1", 9, State.LEFT, "e"),)),
        PushPull("a", (alive("a"), Update("f", "f:1", 1, State.DEAD, "b")), True, True),
        Announce("a", (KEY,), (KEY[::-1],)),
        Handoff("a", ((KEY, ("a", "b")),)),
        Lookup(5, "a", (KEY,)),
        LookupReply(5, "b", (("a", "c"), ())),
    ],
)
def test_every_message_survives_a_msgpack_round_trip(msg: object) -> None:
    wire = msgpack.unpackb(msgpack.packb(msg.to_wire()))  # type: ignore[attr-defined]
    assert decode(wire) == msg
    assert type(msg).from_wire(wire) == msg  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        ("nope", "non-empty list"),
        ([99, 1], "unknown mesh message kind"),
        ([1, 1, "a"], "needs 4 fields"),
        ([1, -1, "a", "b", []], "non-negative"),
        ([5, "a", [["n", "n:1", 0, 7, "n"]]], "unknown member state"),
        ([20, "a", [b"short"], []], "16 bytes"),
        ([6, "a", [], "yes", False], "booleans"),
    ],
)
def test_malformed_messages_raise_protocol_error(wire: object, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode(wire)


def test_from_wire_checks_the_kind() -> None:
    with pytest.raises(ProtocolError, match="expected Ping"):
        Ping.from_wire(Nack(1, "a").to_wire())


def test_presets_and_validation() -> None:
    assert (LAN.probe_interval_s, LAN.probe_timeout_s, LAN.indirect_checks) == (1.0, 0.5, 3)
    assert LAN.push_pull_interval_s == 30.0
    local = MembershipConfig.LOCAL()
    assert local.probe_interval_s == pytest.approx(0.2)
    assert local.probe_timeout_s < local.probe_interval_s
    with pytest.raises(ConfigError, match="probe_timeout_s must be shorter"):
        LAN.with_(probe_timeout_s=2.0)
    with pytest.raises(ConfigError, match="indirect_checks"):
        LAN.with_(indirect_checks=0)


# -- state machine ------------------------------------------------------------------------


def test_join_is_a_push_pull_and_both_sides_learn_each_other() -> None:
    a, b = core("a"), core("b")
    (out,) = a.join(["b:1"], 0.0)
    assert out.to == "b:1" and isinstance(out.msg, PushPull) and out.msg.join
    (reply,) = b.handle("a:1", out.msg, 0.0)
    assert isinstance(reply.msg, PushPull) and reply.msg.reply and reply.to == "a:1"
    a.handle("b:1", reply.msg, 0.0)
    assert a.alive() == b.alive() == ["a", "b"]
    assert [(e.kind, e.node) for e in a.drain_events()] == [(EventKind.JOINED, "b")]
    assert [(e.kind, e.node) for e in b.drain_events()] == [(EventKind.JOINED, "a")]


def test_suspicion_about_self_is_refuted_with_a_higher_incarnation() -> None:
    a = core("a")
    with_members(a, ["b", "c"])
    a.handle("b:1", Gossip("b", (Update("a", "a:1", 5, State.SUSPECT, "b"),)), 1.0)
    assert a.incarnation == 6
    assert a.stats.refutes == 1 and a.health == 1
    out = a.tick(1.0)
    gossip = [u for o in out for u in getattr(o.msg, "updates", ()) if u.node == "a"]
    assert gossip and gossip[0] == Update("a", "a:1", 6, State.ALIVE, "a")


def test_another_address_claiming_our_id_is_reported_once_to_the_shell() -> None:
    a = core("a")
    with_members(a, ["b"])
    assert a.take_claims() == []
    a.handle("b:1", Gossip("b", (Update("a", "elsewhere:9", 0, State.ALIVE, "b"),)), 1.0)
    a.handle("b:1", Gossip("b", (Update("a", "elsewhere:9", 3, State.ALIVE, "b"),)), 1.1)
    a.handle("b:1", Gossip("b", (Update("a", "a:1", 0, State.ALIVE, "b"),)), 1.2)  # our own
    assert a.take_claims() == ["elsewhere:9"]
    assert a.take_claims() == []  # handed over once


def test_old_gossip_cannot_resurrect_a_dead_member() -> None:
    a = core("a")
    with_members(a, ["b", "c"])
    a.handle("c:1", Gossip("c", (Update("b", "b:1", 3, State.DEAD, "c"),)), 1.0)
    a.handle("c:1", Gossip("c", (alive("b", 3), alive("b", 1))), 2.0)
    assert a.alive() == ["a", "c"]
    a.handle("c:1", Gossip("c", (alive("b", 4),)), 3.0)
    assert a.alive() == ["a", "b", "c"]
    kinds = [(e.kind, e.incarnation) for e in a.drain_events()]
    assert kinds == [(EventKind.DEAD, 3), (EventKind.JOINED, 4)]


def test_dead_members_are_forgotten_after_retention() -> None:
    a = core("a", dead_retention_s=20.0)
    with_members(a, ["b", "c"])
    a.handle("c:1", Gossip("c", (Update("b", "b:1", 0, State.LEFT, "b"),)), 1.0)
    assert a.member("b") is not None and a.member("b").state is State.LEFT  # type: ignore[union-attr]
    t = 1.0
    while t < 30.0:
        t = max(t + 0.01, a.next_deadline())
        a.tick(t)
    assert a.member("b") is None


def test_suspicion_timeout_shrinks_with_independent_confirmations() -> None:
    names = [f"n{i}" for i in range(10)]
    n = len(names) + 1
    min_s = LAN.suspicion_mult * math.log10(n) * LAN.probe_interval_s
    max_s = LAN.suspicion_max_timeout_mult * min_s

    def dead_time(confirmers: list[str]) -> float:
        a = core("a")
        with_members(a, names)
        a.handle("n1:1", Gossip("n1", (Update("n0", "n0:1", 0, State.SUSPECT, "n1"),)), 0.0)
        for c in confirmers:
            a.handle(f"{c}:1", Gossip(c, (Update("n0", "n0:1", 0, State.SUSPECT, c),)), 0.1)
        t = 0.1
        while t < 2 * max_s:
            t = max(t + 0.001, min(a.next_deadline(), t + 0.25))
            for o in a.tick(t):
                if isinstance(o.msg, Ping):  # every probe of a succeeds: no self-confirmation
                    a.handle(o.to, Ack(o.msg.seq, o.msg.target), t)
            for e in a.drain_events():
                if e.kind is EventKind.DEAD:
                    return t
        raise AssertionError("never declared dead")

    assert dead_time([]) == pytest.approx(max_s, abs=0.3)
    assert min_s < dead_time(["n2"]) < max_s - 1
    assert dead_time(["n2", "n3"]) == pytest.approx(min_s, abs=0.3)
    # the same confirmer twice is not independent
    assert dead_time(["n2", "n2"]) == pytest.approx(dead_time(["n2"]), abs=0.01)


def test_a_fresh_suspect_is_probed_next_and_told_it_is_suspected() -> None:
    a = core("a")
    with_members(a, [f"n{i}" for i in range(10)])
    t = 0.0
    while t < 5.0:  # settle into the probe rhythm
        t = a.next_deadline()
        a.tick(t)
    a.handle("n1:1", Gossip("n1", (Update("n7", "n7:1", 0, State.SUSPECT, "n1"),)), t)
    pings = []
    while not pings:
        t = a.next_deadline()
        pings = [o for o in a.tick(t) if isinstance(o.msg, Ping)]
    (ping,) = pings
    assert ping.to == "n7:1" and isinstance(ping.msg, Ping)
    assert ping.msg.updates[0] == Update("n7", "n7:1", 0, State.SUSPECT, "a")


def test_failed_probes_raise_local_health_and_stretch_the_probe_interval() -> None:
    a = core("a")
    with_members(a, [f"n{i}" for i in range(8)])
    t = 0.0
    pings: list[float] = []
    while t < 60.0:
        t = a.next_deadline()
        for o in a.tick(t):
            if isinstance(o.msg, Ping):
                pings.append(t)
    # nobody ever answers: health climbs to its cap and probes slow down accordingly
    assert a.health == LAN.awareness_max_multiplier - 1
    gaps = [b - x for x, b in zip(pings, pings[1:], strict=False)]
    assert gaps[0] == pytest.approx(1.0)
    assert max(gaps) == pytest.approx(LAN.probe_interval_s * LAN.awareness_max_multiplier)


def test_relay_forwards_ack_or_answers_nack() -> None:
    r = core("r")
    (ping,) = r.handle("a:1", PingReq(41, "a", "t", "t:1"), 0.0)
    assert ping.to == "t:1" and isinstance(ping.msg, Ping) and ping.msg.target == "t"
    (ack,) = r.handle("t:1", Ack(ping.msg.seq, "t"), 0.1)
    assert ack.to == "a:1" and isinstance(ack.msg, Ack) and ack.msg.seq == 41
    r.handle("a:1", PingReq(42, "a", "t", "t:1"), 1.0)
    nack_at = 1.0 + 0.8 * LAN.probe_timeout_s
    assert not [o for o in r.tick(nack_at - 0.01) if isinstance(o.msg, Nack)]
    nacks = [o for o in r.tick(nack_at) if isinstance(o.msg, Nack)]
    assert [(o.to, o.msg) for o in nacks] == [("a:1", Nack(42, "r"))]


def test_ping_for_another_node_id_is_ignored() -> None:
    a = core("a")
    assert a.handle("b:1", Ping(1, "b", "zzz"), 0.0) == []
    assert a.stats.messages_ignored == 1
    assert a.handle("b:1", Announce("b"), 0.0) == []
    assert a.stats.messages_ignored == 2


def test_broadcast_queue_is_bounded_and_piggyback_limited() -> None:
    a = core("a", broadcast_queue_limit=4, max_piggyback=3)
    a.handle("x:1", Gossip("x", tuple(alive(f"n{i}") for i in range(20))), 0.0)
    assert a.stats.broadcasts_dropped == 17  # 21 updates (own alive + 20) into 4 places
    (out,) = a.handle("b:1", Ping(1, "b", "a"), 0.0)
    assert isinstance(out.msg, Ack) and len(out.msg.updates) == 3
    # newest first: the last joiners are gossiped before older ones
    assert out.msg.updates[0].node == "n19"


def test_leave_gossips_left_not_dead() -> None:
    sim = Sim(seed=3, config=MembershipConfig.LOCAL())
    names = start_cluster(sim, 6)
    assert run_until_converged(sim, limit=20.0) is not None
    sim.leave(names[3], sim.now + 0.1)
    sim.run(sim.now + 5.0)
    about = [r for r in sim.log if r.node == names[3] and r.kind is not EventKind.JOINED]
    assert {r.kind for r in about} == {EventKind.LEFT}
    assert {r.observer for r in about} == set(names) - {names[3]}


def test_crashed_member_is_declared_dead_and_restart_rejoins_higher() -> None:
    sim = Sim(seed=4, config=MembershipConfig.LOCAL(), loss=0.01)
    names = start_cluster(sim, 8)
    assert run_until_converged(sim, limit=20.0) is not None
    victim = names[5]
    sim.crash(victim, sim.now)
    sim.run(sim.now + 10.0)
    dead_by = {r.observer for r in sim.log if r.node == victim and r.kind is EventKind.DEAD}
    assert dead_by == set(names) - {victim}
    dead_inc = max(sim.nodes[n].core.member(victim).incarnation for n in names if n != victim)  # type: ignore[union-attr]
    sim.restart(victim, sim.now, [names[0]])
    sim.run(sim.now + 10.0)
    assert sim.converged()
    assert sim.nodes[victim].core.incarnation > dead_inc


def test_refutation_during_a_probe_outranks_the_failed_probe() -> None:
    a = core("a")
    with_members(a, [f"n{i}" for i in range(5)])
    t = 0.0
    pings: list[Ping] = []
    while not pings:
        t = a.next_deadline()
        pings = [o.msg for o in a.tick(t) if isinstance(o.msg, Ping)]
    target = pings[0].target
    # the target refutes some other suspicion (incarnation 1) while our ping is lost
    a.handle("x:1", Gossip("x", (alive(target, 1),)), t + 0.1)
    end = t + LAN.probe_interval_s
    while t < end:
        t = a.next_deadline()
        a.tick(t)
    assert a.member(target).state is State.ALIVE  # type: ignore[union-attr]
    assert not [e for e in a.drain_events() if e.kind is EventKind.SUSPECT]
    assert a.stats.probe_failures == 1
