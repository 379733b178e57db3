"""``meshkv bench {local,mesh,vllm,kernels}``: dispatches to ``meshkv.bench.<name>``.

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and
writes the shared JSON shape (see ``meshkv.bench.report``).
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

BENCHMARKS = {
    "local": "CPU and SSD tiers through a real agent's local channel",
    "mesh": "peer pulls over TCP/UCX, lookups through the home, simulation wall time",
    "vllm": "TTFT of a real vLLM engine with and without meshkv (and LMCache)",
    "kernels": "gather/scatter kernels against a plain copy",
}


def register(sub: Any) -> None:
    bench: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="run a benchmark (prints a table, writes JSON)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    kinds = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, text in BENCHMARKS.items():
        p = kinds.add_parser(
            name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        p.add_argument("--json", metavar="FILE", help="write results to FILE as JSON")
        try:
            module = importlib.import_module(f"meshkv.bench.{name}")
        except ImportError:
            p.set_defaults(func=_missing(name))
            continue
        module.add_arguments(p)
        p.set_defaults(func=module.run)


def _missing(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        print(f"benchmark {name!r} is not available in this build")
        return 2

    return run
