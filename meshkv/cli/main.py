"""``meshkv`` command line: one sub-command module per verb.

Each module under ``meshkv.cli`` exposes ``register(subparsers)``; the parser it adds
carries ``func(args) -> int``. Environment variables are read here and nowhere else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from meshkv import __version__
from meshkv.cli import agent_cmd, bench_cmd, proxy_cmd, ring_cmd, status_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshkv",
        description="meshkv: a peer-to-peer KV-cache mesh for LLM inference engines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"meshkv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (agent_cmd, status_cmd, ring_cmd, proxy_cmd, bench_cmd):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
