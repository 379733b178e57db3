"""``meshkv bench {local,mesh,kernels,pd,serve,route,faults,soak}``: measure this deployment
against its own limits.

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and
writes the shared JSON shape (see ``meshkv.bench.report``). Comparisons with other systems
(LMCache, vLLM's prefix cache on a tiny model) and the simulator's wall time need the
source tree and live in ``benchmarks/`` (``make bench``).
"""

from __future__ import annotations

import argparse
from typing import Any

from meshkv.bench import faults, kernels, local, mesh, pd, route, serve, soak

BENCHMARKS = {
    "local": ("CPU and SSD tiers through a real agent's local channel", local),
    "mesh": ("peer pulls over TCP/UCX against raw sockets and Redis, lookups through homes", mesh),
    "kernels": ("gather/scatter kernels against a plain copy", kernels),
    "pd": ("prefill/decode disaggregation against aggregated engines (real vLLM servers)", pd),
    "serve": ("many users on real OpenAI servers: meshkv vs LMCache vs prefix cache", serve),
    "faults": ("kill, stall, fill and damage the agent while a real server serves users", faults),
    "soak": ("mixed load and agent churn on a small mesh for N minutes, then a leak check", soak),
    "route": ("routing policies over several engines, with and without the mesh", route),
}


def register(sub: Any) -> None:
    bench: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="run a benchmark (prints a table, writes JSON)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    kinds = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (text, module) in BENCHMARKS.items():
        p = kinds.add_parser(
            name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        p.add_argument("--json", metavar="FILE", help="write results to FILE as JSON")
        module.add_arguments(p)
        p.set_defaults(func=module.run)
