"""Crash detection: how long until the surviving members declare a crashed member dead.

A cluster of ``n`` nodes (LAN preset, ``loss`` packet loss) settles, then ``crashes``
members crash one at a time, ``gap_s`` apart. For every (crash, survivor) pair the
detection time is the time from the crash to the survivor's DEAD event for that member.
"""

from __future__ import annotations

import sys
from typing import Any

from meshkv.mesh.config import MembershipConfig
from meshkv.mesh.membership import EventKind
from simulations.report import main
from simulations.sim import LogRecord, Sim, percentile, run_until_converged, start_cluster


def run(
    seed: int = 1,
    n: int = 64,
    loss: float = 0.01,
    crashes: int = 5,
    gap_s: float = 60.0,
    config: MembershipConfig | None = None,
) -> dict[str, Any]:
    """Crash members one at a time and measure detection time per survivor."""
    sim = Sim(seed=seed, config=config or MembershipConfig.LAN(), loss=loss)
    names = start_cluster(sim, n)
    settled = run_until_converged(sim, limit=120.0)
    if settled is None:
        raise RuntimeError("cluster did not converge before crashing members")
    crash_at: dict[str, float] = {}
    dead_at: dict[str, dict[str, float]] = {}

    def watch(rec: LogRecord) -> None:
        if rec.kind is EventKind.DEAD and rec.node in crash_at:
            dead_at[rec.node].setdefault(rec.observer, rec.time)

    sim.listeners.append(watch)
    t0 = sim.now + 5.0
    victims = [names[-1 - i] for i in range(crashes)]  # never the seed
    for i, v in enumerate(victims):
        crash_at[v] = t0 + i * gap_s
        dead_at[v] = {}
        sim.crash(v, crash_at[v])
    sim.run(t0 + crashes * gap_s)
    times: list[float] = []
    fractions = []
    for i, v in enumerate(victims):
        survivors = [x for x in names if x not in victims[: i + 1]]
        seen = [dead_at[v][o] - crash_at[v] for o in survivors if o in dead_at[v]]
        times.extend(seen)
        fractions.append(len(seen) / len(survivors))
    false_dead = sum(1 for r in sim.log if r.kind is EventKind.DEAD and r.node not in crash_at)
    return {
        "n": n,
        "loss": loss,
        "crashes": crashes,
        "settled_s": settled,
        "min_fraction_declared_dead": min(fractions),
        "detection_p50_s": round(percentile(times, 50), 3),
        "detection_p99_s": round(percentile(times, 99), 3),
        "detection_max_s": round(max(times), 3) if times else None,
        "false_dead_events": false_dead,
        "detection_s": [round(t, 4) for t in sorted(times)],
    }


def _plot(fig: Any, r: dict[str, Any]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    xs = r["detection_s"]
    ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))])
    ax.set_xlabel("detection time (s)")
    ax.set_ylabel("fraction of (crash, survivor) pairs")
    ax.set_title(f"crash detection, N={r['n']}, loss={r['loss']}")


if __name__ == "__main__":
    sys.exit(
        main(
            "detection",
            run,
            options={"n": int, "loss": float, "crashes": int, "gap_s": float},
            plot=_plot,
        )
    )
