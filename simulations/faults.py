"""Faults that must *not* kill healthy members, and pauses that must be handled right.

* ``healthy``: a settled cluster at ``loss`` packet loss for ``duration_s``: no DEAD events.
* ``pause``: one member is frozen ``short_pauses`` times for ``short_s`` (shorter than the
  suspicion timeout): it
  may be suspected, must refute (ALIVE with a higher incarnation) and never be declared
  dead; later it is frozen for ``long_s``: it is declared dead and, on resume, rejoins
  with a higher incarnation.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

from meshkv.mesh.config import MembershipConfig
from meshkv.mesh.membership import EventKind
from simulations.report import main
from simulations.sim import Sim, run_until_converged, start_cluster


def run_healthy(
    seed: int = 1, n: int = 64, loss: float = 0.01, duration_s: float = 300.0
) -> dict[str, Any]:
    """Count false suspicions and false deaths in a healthy lossy cluster."""
    sim = Sim(seed=seed, config=MembershipConfig.LAN(), loss=loss)
    start_cluster(sim, n)
    settled = run_until_converged(sim, limit=120.0)
    if settled is None:
        raise RuntimeError("cluster did not converge")
    first = len(sim.log)
    sim.run(settled + duration_s)
    kinds = Counter(r.kind for r in sim.log[first:])
    return {
        "n": n,
        "loss": loss,
        "duration_s": duration_s,
        "suspect_events": kinds[EventKind.SUSPECT],
        "dead_events": kinds[EventKind.DEAD],
        "converged_at_end": sim.converged(),
    }


def run_pause(
    seed: int = 1,
    n: int = 64,
    loss: float = 0.01,
    short_s: float = 2.0,
    long_s: float = 30.0,
    short_pauses: int = 5,
) -> dict[str, Any]:
    """Freeze one member briefly, then for long; report what the others concluded."""
    sim = Sim(seed=seed, config=MembershipConfig.LAN(), loss=loss)
    names = start_cluster(sim, n)
    settled = run_until_converged(sim, limit=120.0)
    if settled is None:
        raise RuntimeError("cluster did not converge")
    victim = names[n // 2]
    inc0 = sim.nodes[victim].core.incarnation
    t_short = sim.now + 5.0
    # several short pauses: whether one is noticed depends on probe timing
    for i in range(short_pauses):
        sim.pause(victim, t_short + i * 20.0, short_s)
    sim.run(t_short + short_pauses * 20.0 + 10.0)
    short = [r for r in sim.log if r.node == victim and r.time >= t_short]
    inc1 = sim.nodes[victim].core.incarnation
    short_converged = sim.converged()
    t_long = sim.now + 5.0
    sim.pause(victim, t_long, long_s)
    sim.run(t_long + long_s)
    dead_during = {r.observer for r in sim.log if r.node == victim and r.kind is EventKind.DEAD}
    sim.run(t_long + long_s + 30.0)
    rejoin = [
        r
        for r in sim.log
        if r.node == victim and r.kind is EventKind.JOINED and r.time >= t_long + long_s
    ]
    others = [x for x in names if x != victim]
    return {
        "n": n,
        "short_pause_s": short_s,
        "short_pauses": short_pauses,
        "short_suspected_by": len({r.observer for r in short if r.kind is EventKind.SUSPECT}),
        "short_dead_by": len({r.observer for r in short if r.kind is EventKind.DEAD}),
        "short_refuted": inc1 > inc0,
        "short_converged": short_converged,
        "long_pause_s": long_s,
        "long_dead_by_fraction": len(dead_during) / len(others),
        "rejoined_by_fraction": len({r.observer for r in rejoin}) / len(others),
        "incarnation_before_long": inc1,
        "incarnation_after_rejoin": sim.nodes[victim].core.incarnation,
        "converged_at_end": sim.converged(),
    }


def run(
    seed: int = 1, n: int = 64, loss: float = 0.01, duration_s: float = 300.0
) -> dict[str, Any]:
    """Both fault scenarios."""
    out = {f"healthy_{k}": v for k, v in run_healthy(seed, n, loss, duration_s).items()}
    out.update({f"pause_{k}": v for k, v in run_pause(seed, n, loss).items()})
    return out


if __name__ == "__main__":
    sys.exit(main("faults", run, options={"n": int, "loss": float, "duration_s": float}))
