"""Directory under churn: do lookups at the homes stay accurate when members come and go?

Every node runs the membership and directory cores (as the agent's shell does) over a
lossy network. Each node holds ``keys_per_node`` keys drawn from a shared pool, so most
keys have several holders. Then ``crashes`` members crash (their homes' entries and their
holder records must go) and ``joins`` new members join (entries whose home moved must be
handed over or re-announced). Accuracy is measured from every live node's point of view:
for each (key, live holder) pair, does the key's home (by that node's ring) list the
holder; and does any answer still list a crashed node.
"""

from __future__ import annotations

import random
import sys
from typing import Any

from meshkv.mesh.config import DirectoryConfig, MembershipConfig
from simulations.report import main
from simulations.sim import Sim, SimNode, node_name, run_until_converged, start_cluster


def _accuracy(sim: Sim, held: dict[str, list[bytes]], crashed: set[str]) -> tuple[float, float]:
    """(fraction of (key, live holder) pairs found, fraction of answers naming a crash),
    seen from a few live nodes' rings, over a sample of 20 keys per holder."""
    live = set(sim.up())
    up = [n for n in sim.up() if n in held]
    holders_of: dict[bytes, set[str]] = {}
    for holder in up:
        for k in held[holder][:20]:
            holders_of.setdefault(k, set()).add(holder)
    found = total = stale = answers = 0
    for asker in up[:4]:
        ring = sim.nodes[asker].ring
        assert ring is not None
        for k, want in holders_of.items():
            home = sim.nodes[ring.owner(k)]
            total += len(want)
            answers += 1
            if home.directory is None or home.node_id not in live:
                continue  # the home crashed and this node has not noticed yet
            got = set(home.directory.answer_lookup([k], sim.now)[0])
            found += len(want & got)
            stale += 1 if got & crashed else 0
    return found / max(1, total), stale / max(1, answers)


def run(
    seed: int = 1,
    n: int = 32,
    loss: float = 0.01,
    keys_per_node: int = 200,
    pool: int = 3000,
    crashes: int = 3,
    joins: int = 3,
) -> dict[str, Any]:
    """Measure directory accuracy before and after crashes and joins."""
    dcfg = DirectoryConfig(reannounce_interval_s=30.0, entry_ttl_s=75.0)
    sim = Sim(seed=seed, config=MembershipConfig.LAN(), loss=loss, directory=dcfg)
    names = start_cluster(sim, n)
    if run_until_converged(sim, limit=120.0) is None:
        raise RuntimeError("cluster did not converge")
    rng = random.Random(f"directory/{seed}")
    keyspace = [rng.randbytes(16) for _ in range(pool)]
    held: dict[str, list[bytes]] = {}
    for name in names:
        held[name] = rng.sample(keyspace, keys_per_node)

        def add(node: SimNode, now: float, ks: list[bytes] = held[name]) -> None:
            assert node.directory is not None
            node.directory.add_local(ks, now)

        sim.act(name, add)
    sim.run(sim.now + 2.0)
    before = _accuracy(sim, held, set())
    # crashes (never the seed)
    victims = set(rng.sample(names[1:], crashes))
    t_crash = sim.now
    for v in sorted(victims):
        sim.crash(v, t_crash)
    timeline = []
    repaired_at = None
    while sim.now < t_crash + 120.0:
        sim.run(sim.now + 1.0)
        acc, stale = _accuracy(sim, held, victims)
        timeline.append((round(sim.now - t_crash, 1), round(acc, 4), round(stale, 4)))
        if repaired_at is None and acc >= 0.999 and stale == 0:
            repaired_at = sim.now - t_crash
            break
    # joins: new members become homes of some keys
    t_join = sim.now
    for i in range(joins):
        sim.add_node(node_name(n + i), [names[0]], at=t_join)
    joined_at = None
    while sim.now < t_join + 120.0:
        sim.run(sim.now + 1.0)
        acc, stale = _accuracy(sim, held, victims)
        if sim.converged() and acc >= 0.999 and stale == 0:
            joined_at = sim.now - t_join
            break
    final = _accuracy(sim, held, victims)
    return {
        "n": n,
        "loss": loss,
        "keys_per_node": keys_per_node,
        "accuracy_before": round(before[0], 4),
        "crashes": crashes,
        "repaired_after_crash_s": repaired_at,
        "joins": joins,
        "accurate_after_join_s": joined_at,
        "final_accuracy": round(final[0], 4),
        "final_stale_answers": final[1],
        "timeline_after_crash": timeline,
    }


if __name__ == "__main__":
    sys.exit(main("directory_churn", run, options={"n": int, "loss": float, "crashes": int}))
