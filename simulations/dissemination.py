"""Dissemination: how fast one update (an incarnation bump) reaches every member.

After the cluster settles, ``trials`` times a random member gossips ALIVE with a higher
incarnation; the spread time is when 99.9 % of the other members (all of them, for
N < 1000) hold the new incarnation. Membership is polled every ``poll_s``.
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
) -> dict[str, Any]:
    """Bump a random member's incarnation ``trials`` times; time until it is known."""
    sim = Sim(seed=seed, config=MembershipConfig.LAN(), loss=loss)
    names = start_cluster(sim, n)
    if run_until_converged(sim, limit=120.0) is None:
        raise RuntimeError("cluster did not converge")
    sim.run(sim.now + 10.0)
    pick = random.Random(f"dissemination/{seed}")
    spread: list[float] = []
    for _ in range(trials):
        who = pick.choice(names)
        core = sim.nodes[who].core
        start = sim.now
        sim.act(who, lambda c, now: c.bump_incarnation(now))
        want = core.incarnation
        others = [x for x in names if x != who]
        need = math.ceil(quantile * len(others))
        t_done = math.nan
        while sim.now - start < 10.0:
            sim.run(sim.now + poll_s)
            have = 0
            for x in others:
                m = sim.nodes[x].core.member(who)
                if m is not None and m.incarnation >= want:
                    have += 1
            if have >= need:
                t_done = sim.now - start
                break
        spread.append(t_done)
        sim.run(sim.now + 5.0)
    ok = [s for s in spread if not math.isnan(s)]
    return {
        "n": n,
        "loss": loss,
        "trials": trials,
        "quantile": quantile,
        "reached": len(ok),
        "spread_p50_s": round(percentile(ok, 50), 3),
        "spread_max_s": round(max(ok), 3) if ok else None,
        "spread_s": [round(s, 3) for s in spread],
    }


if __name__ == "__main__":
    sys.exit(main("dissemination", run, options={"n": int, "loss": float, "trials": int}))
