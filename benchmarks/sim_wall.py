"""Wall time of the 256-node, 600-simulated-second membership simulation.

    python -m benchmarks.sim_wall [--json FILE]

Run from the repository root (``simulations/`` is a source-tree package). Target: the
whole run in <= 60 s of wall time on two cores.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from meshkv.bench.report import Report, Result
from simulations import scale

TARGET_WALL_S = 60.0


def run_sim_result(seed: int = 1, n: int = 256, duration_s: float = 600.0) -> dict[str, Any]:
    """Run the churn scenario (``n`` nodes, ``duration_s`` virtual seconds, 1 % loss); its
    result holds ``wall_s``, ``cpu_s``, the log digest and counts."""
    out: dict[str, Any] = scale.run(seed=seed, n=n, duration_s=duration_s)
    return out


def run_sim_wall(seed: int = 1, n: int = 256, duration_s: float = 600.0) -> float:
    return float(run_sim_result(seed, n, duration_s)["wall_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="write results to FILE as JSON")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    report = Report("sim_wall")
    wall = run_sim_wall(args.seed)
    report.add(Result("sim_256x600s_wall", wall, "s", None, "target", TARGET_WALL_S))
    print(report.table())
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
