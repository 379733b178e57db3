"""Partition and heal: two halves lose each other, then the network heals.

During the partition each half declares (almost all of) the other dead. After ``heal`` the reconnect
loop (push-pull with a random dead member) lets each side learn it was declared dead; it
refutes with a higher incarnation and the views converge. Reports the time from heal to
every member seeing every member alive.
"""

from __future__ import annotations

import sys
from typing import Any

from meshkv.mesh.config import MembershipConfig
from meshkv.mesh.membership import EventKind
from simulations.report import main
from simulations.sim import Sim, run_until_converged, start_cluster


def run(
    seed: int = 1, n: int = 64, loss: float = 0.01, split_s: float = 60.0, limit_s: float = 120.0
) -> dict[str, Any]:
    """Split the cluster in two halves for ``split_s`` seconds, heal, time convergence."""
    sim = Sim(seed=seed, config=MembershipConfig.LAN(), loss=loss)
    names = start_cluster(sim, n)
    if run_until_converged(sim, limit=120.0) is None:
        raise RuntimeError("cluster did not converge")
    a, b = names[: n // 2], names[n // 2 :]
    t_split = sim.now + 1.0
    sim.partition([a, b], t_split)
    sim.heal(t_split + split_s)
    sim.run(t_split + split_s)
    # Lifeguard slows a node whose probes keep failing (local health), so in a large split
    # the last cross-side members may still be only suspected when the split ends
    cross = [(x, y) for side, other in ((a, b), (b, a)) for x in side for y in other]
    unseen = sum(1 for x, y in cross if y not in sim.nodes[x].core.alive())
    dead_events = sum(1 for r in sim.log if r.kind is EventKind.DEAD and r.time >= t_split)
    healed = run_until_converged(sim, limit=sim.now + limit_s, step=0.5)
    return {
        "n": n,
        "loss": loss,
        "split_s": split_s,
        "cross_pairs_dead_at_heal": round(unseen / len(cross), 4),
        "dead_events_during_partition": dead_events,
        "converged": healed is not None,
        "converge_after_heal_s": None if healed is None else round(healed - t_split - split_s, 3),
    }


if __name__ == "__main__":
    sys.exit(main("partition", run, options={"n": int, "loss": float, "split_s": float}))
