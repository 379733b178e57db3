"""Dissemination: how fast one update (an incarnation bump) reaches every member.

After the cluster settles, ``trials`` times a random member gossips ALIVE with a higher
incarnation; for every (trial, other member) pair the time it holds the new incarnation is
recorded (membership polled every ``poll_s``). Reports the fraction of pairs reached within
``target_s`` and the pooled ``quantile`` of the receive times.
"""

from __future__ import annotations

import math
import random
import sys
from typing import Any

from meshkv.mesh.config import MembershipConfig
from simulations.report import main
from simulations.sim import Sim, percentile, run_until_converged, start_cluster


def run(
    seed: int = 1,
    n: int = 64,
    loss: float = 0.01,
    trials: int = 20,
    poll_s: float = 0.01,
    quantile: float = 0.999,
    target_s: float = 1.5,
    horizon_s: float = 10.0,
) -> dict[str, Any]:
    """Bump a random member's incarnation ``trials`` times; time until it is known."""
    sim = Sim(seed=seed, config=MembershipConfig.LAN(), loss=loss)
    names = start_cluster(sim, n)
    if run_until_converged(sim, limit=120.0) is None:
        raise RuntimeError("cluster did not converge")
    sim.run(sim.now + 10.0)
    pick = random.Random(f"dissemination/{seed}")
    per_trial: list[float] = []  # time until `quantile` of the others have it
    received: list[float] = []  # per (trial, other member): time it got the update
    for _ in range(trials):
        who = pick.choice(names)
        start = sim.now
        sim.act(who, lambda node, now: node.core.bump_incarnation(now))
        want = sim.nodes[who].core.incarnation
        waiting = {x for x in names if x != who}
        got: list[float] = []
        need = math.ceil(quantile * len(waiting))
        t_q = math.nan
        while waiting and sim.now - start < horizon_s:
            sim.run(sim.now + poll_s)
            for x in sorted(waiting):
                m = sim.nodes[x].core.member(who)
                if m is not None and m.incarnation >= want:
                    waiting.discard(x)
                    got.append(sim.now - start)
            if math.isnan(t_q) and len(got) >= need:
                t_q = sim.now - start
        per_trial.append(t_q)
        received.extend(got)
        received.extend([math.inf] * len(waiting))
        sim.run(sim.now + 5.0)
    within = sum(1 for r in received if r <= target_s) / len(received)
    finite = [r for r in received if math.isfinite(r)]
    pooled_q = sorted(received)[math.ceil(quantile * len(received)) - 1]
    return {
        "n": n,
        "loss": loss,
        "trials": trials,
        "quantile": quantile,
        "target_s": target_s,
        "fraction_within_target": round(within, 5),
        "pooled_quantile_s": round(pooled_q, 3) if math.isfinite(pooled_q) else None,
        "trials_fully_reached": sum(1 for r in per_trial if not math.isnan(r)),
        "spread_p50_s": round(percentile(finite, 50), 3),
        "spread_max_s": round(max(finite), 3) if finite else None,
        "per_trial_quantile_s": [round(r, 3) for r in per_trial],
    }


if __name__ == "__main__":
    sys.exit(main("dissemination", run, options={"n": int, "loss": float, "trials": int}))
