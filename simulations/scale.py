"""Scale and determinism: 256 nodes for 10 simulated minutes with churn.

The cluster joins through one seed, runs at ``loss`` packet loss, and along the way a few
members crash, one restarts, one leaves gracefully and one is paused for longer than the
suspicion timeout. The result carries the SHA-256 of the full event log (equal for equal
seeds) and the wall time the simulation took.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

from meshkv.mesh.config import MembershipConfig
from simulations.report import main
from simulations.sim import Sim, start_cluster


def run(
    seed: int = 1, n: int = 256, duration_s: float = 600.0, loss: float = 0.01
) -> dict[str, Any]:
    """Run the churn scenario and return the log digest, event counts and wall time."""
    t0 = time.perf_counter()
    c0 = time.process_time()
    sim = Sim(seed=seed, config=MembershipConfig.LAN(), loss=loss)
    names = start_cluster(sim, n, spacing=0.02)
    d = duration_s
    sim.crash(names[n - 1], 0.3 * d)
    sim.crash(names[n - 2], 0.4 * d)
    sim.restart(names[n - 2], 0.6 * d, [names[0]])
    sim.leave(names[n - 3], 0.5 * d)
    sim.pause(names[n - 4], 0.7 * d, 30.0)
    sim.run(d)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    kinds = Counter(r.kind.value for r in sim.log)
    expected = sorted(set(names) - {names[n - 1], names[n - 3]})
    return {
        "n": n,
        "duration_s": duration_s,
        "loss": loss,
        "log_sha256": sim.log_digest(),
        "events": len(sim.log),
        "events_by_kind": dict(sorted(kinds.items())),
        "messages_sent": sim.net.sent,
        "converged_at_end": sim.converged(expected),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
    }


if __name__ == "__main__":
    sys.exit(main("scale", run, options={"n": int, "duration_s": float, "loss": float}))
