"""Ring balance and movement: ownership max/mean for 8..64 members, and the fraction of the
hash space whose home changes when one member joins or leaves (relative to 1/N).

Exact (computed from arc lengths, not sampled keys). Also times ``owners_many`` for 2,000
keys, the size of a long prompt's lookup.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

from meshkv.mesh.config import RingConfig
from meshkv.mesh.ring import Ring
from simulations.report import main


def run(
    seed: int = 1, sizes: str = "8,16,32,48,64", vnodes: int | None = None, leaves: int = 16
) -> dict[str, Any]:
    """Measure balance and movement over the given member counts."""
    cfg = RingConfig() if vnodes is None else RingConfig(vnodes=vnodes)
    rng = random.Random(f"ring/{seed}")
    rows = []
    for n in (int(x) for x in sizes.split(",")):
        names = [f"node-{seed}-{rng.getrandbits(32):08x}" for _ in range(n)]
        ring = Ring(names, cfg)
        joined = Ring([*names, f"node-{seed}-new"], cfg)
        join_moved = ring.moved_fraction(joined) * n
        gone = rng.sample(names, min(leaves, n))
        # the largest member's leave is the worst case: include it
        biggest = max(names, key=ring.share)
        leave_moved = [
            ring.moved_fraction(Ring([x for x in names if x != g], cfg)) * n
            for g in {*gone, biggest}
        ]
        rows.append(
            {
                "n": n,
                "max_over_mean": round(ring.max_over_mean(), 4),
                "join_moved_x_1_over_n": round(join_moved, 4),
                "leave_moved_mean_x_1_over_n": round(sum(leave_moved) / len(leave_moved), 4),
                "leave_moved_max_x_1_over_n": round(max(leave_moved), 4),
            }
        )
    ring = Ring([f"node-{i}" for i in range(64)], cfg)
    keys = [os.urandom(16) for _ in range(2000)]
    ring.owners_many(keys)
    reps = 50
    t0 = time.perf_counter()
    for _ in range(reps):
        ring.owners_many(keys)
    lookup_ms = (time.perf_counter() - t0) / reps * 1e3
    return {
        "vnodes": cfg.vnodes,
        "worst_max_over_mean": max(r["max_over_mean"] for r in rows),
        "worst_join_moved_x_1_over_n": max(r["join_moved_x_1_over_n"] for r in rows),
        "worst_leave_moved_x_1_over_n": max(r["leave_moved_max_x_1_over_n"] for r in rows),
        "owners_many_2000_keys_ms": round(lookup_ms, 3),
        "rows": rows,
    }


if __name__ == "__main__":
    sys.exit(main("ring_balance", run, options={"sizes": str, "vnodes": int, "leaves": int}))
