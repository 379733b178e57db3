"""Consistent-hash ring: determinism, lookups, balance, movement and lookup speed."""

from __future__ import annotations

import os
import random
import time

import pytest

from meshkv.errors import ConfigError
from meshkv.mesh.config import RingConfig
from meshkv.mesh.ring import Ring
from simulations import ring_balance

NAMES = [f"node-{i}" for i in range(16)]


def keys(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(n)]


def test_same_members_give_the_same_ring_in_any_order() -> None:
    a = Ring(NAMES)
    b = Ring(list(reversed(NAMES)) + NAMES[:3])  # order and duplicates do not matter
    ks = keys(500)
    assert a.digest == b.digest and len(a.digest) == 32
    assert a.owners_many(ks) == b.owners_many(ks)
    assert Ring(NAMES[:-1]).digest != a.digest
    assert Ring(NAMES, RingConfig(vnodes=64)).digest != a.digest


def test_lookup_forms_agree() -> None:
    r = Ring(NAMES)
    ks = keys(300)
    many = r.owners_many(ks)
    assert [r.owner(k) for k in ks] == many
    assert [r.owners(k, 1)[0] for k in ks] == many
    idx = r.owner_indices(ks)
    assert [r.members[i] for i in idx] == many


def test_owners_are_distinct_successors() -> None:
    r = Ring(NAMES[:5])
    for k in keys(50):
        three = r.owners(k, 3)
        assert len(set(three)) == 3 and three[0] == r.owner(k)
        assert r.owners(k, 99) == r.owners(k, 5) and len(r.owners(k, 99)) == 5
        # successors are stable: removing the home promotes the next one
        assert Ring([m for m in NAMES[:5] if m != three[0]]).owner(k) == three[1]


def test_shares_sum_to_one_and_match_sampled_keys() -> None:
    r = Ring(NAMES)
    shares = r.shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    ks = keys(40_000)
    owners = r.owners_many(ks)
    for m in NAMES:
        assert owners.count(m) / len(ks) == pytest.approx(shares[m], abs=0.01)
    assert r.share("not-a-member") == 0.0
    assert r.max_over_mean() == pytest.approx(max(shares.values()) * len(NAMES))


def test_join_moves_keys_only_to_the_new_member() -> None:
    r = Ring(NAMES)
    j = Ring([*NAMES, "newcomer"])
    ks = keys(20_000)
    before, after = r.owners_many(ks), j.owners_many(ks)
    moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert moved and all(b == "newcomer" for _, b in moved)
    assert len(moved) / len(ks) == pytest.approx(r.moved_fraction(j), abs=0.01)


def test_balance_and_movement_targets() -> None:
    res = ring_balance.run(seed=1, sizes="8,16,32,64", leaves=8)
    assert res["worst_max_over_mean"] <= 1.10
    assert res["worst_join_moved_x_1_over_n"] <= 1.05
    for row in res["rows"]:
        # every single leave, the largest member's included, moves <= 1.05/N of the keys
        assert row["leave_moved_max_x_1_over_n"] <= 1.05
        # the largest member's leave moves exactly its share
        assert row["leave_moved_max_x_1_over_n"] <= row["max_over_mean"] + 1e-9


def test_owners_many_2000_keys_within_2ms() -> None:
    r = Ring([f"node-{i}" for i in range(64)])
    ks = [os.urandom(16) for _ in range(2000)]
    best = float("inf")
    for _ in range(20):  # the machine is noisy: the best of 20 runs
        t0 = time.perf_counter()
        r.owners_many(ks)
        best = min(best, time.perf_counter() - t0)
    assert best <= 0.002


def test_bad_input_is_rejected_clearly() -> None:
    r = Ring(NAMES)
    with pytest.raises(ValueError, match="16 bytes"):
        r.owners_many([b"short"])
    with pytest.raises(LookupError, match="no members"):
        Ring([]).owner(bytes(16))
    with pytest.raises(ConfigError, match="vnodes"):
        RingConfig(vnodes=0)


def test_derive_equals_a_fresh_build() -> None:
    rng = random.Random(5)
    members = [f"m{i}" for i in range(20)]
    ring = Ring(members)
    ks = keys(3000, seed=8)
    for step in range(12):
        if step % 3 == 2 and len(members) > 3:
            members.remove(rng.choice(members))  # a leave
        else:
            members.append(f"j{step}")  # a join
            if step % 4 == 0:
                members.remove(rng.choice(members[:-1]))  # and a leave in the same change
        derived = ring.derive(members)
        fresh = Ring(members)
        assert derived.digest == fresh.digest and derived.members == fresh.members
        assert derived.owners_many(ks) == fresh.owners_many(ks)
        assert derived.shares() == pytest.approx(fresh.shares())
        ring = derived
    assert ring.derive(list(reversed(members))) is ring
    assert Ring([]).derive(["a", "b"]).members == ("a", "b")


def test_derive_is_much_cheaper_than_a_full_build() -> None:
    names = [f"node-{i}" for i in range(256)]
    base = Ring(names)
    full = derived = float("inf")
    for i in range(3):
        t0 = time.perf_counter()
        Ring([*names, f"new-{i}"])
        full = min(full, time.perf_counter() - t0)
        t0 = time.perf_counter()
        base.derive([*names, f"new-{i}"])
        derived = min(derived, time.perf_counter() - t0)
    assert derived < full / 3, (derived, full)
