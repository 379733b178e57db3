"""Agent-to-agent pulls by chunk size, against the raw loopback socket of the same run.

    python -m benchmarks.pull_sizes [--sizes 2,16] [--bytes-mib 24] [--rounds 10] [--json F]

Two real agents over TCP; per size, rounds of ``--bytes-mib`` MiB in chunks of that size:
agent A stores them, an engine client on agent B looks them up and reads them (B pulls
them from A), lookup to last lease timed (``meshkv.bench.mesh.measure_pulls``), with the
raw blocking-socket baseline moving the same chunks right before each round (one server
process and connection for the whole run, ``transport_baselines.RawTcpRounds``). 2 MiB is the
chunk of the P/D benchmark's model (256 tokens x 8 KiB), whose transfer this isolates from
the engines; 16 MiB is ``meshkv bench mesh``'s size.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from meshkv.bench import transport_baselines as tb
from meshkv.bench.mesh import measure_pulls
from meshkv.bench.report import Report, Result

MIB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pull_sizes")
    parser.add_argument("--sizes", default="2,16", help="chunk sizes in MiB, comma-separated")
    parser.add_argument("--bytes-mib", type=int, default=24, help="MiB pulled per round")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per size")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x]
    except ValueError:
        parser.error(f"--sizes must be whole MiB separated by commas, got {args.sizes!r}")
    if not sizes or min(sizes) <= 0 or args.bytes_mib <= 0 or args.rounds <= 0:
        parser.error("--sizes, --bytes-mib and --rounds must be positive")
    report = Report("pull_sizes")
    for size in sizes:
        chunks = max(1, args.bytes_mib // size)
        with (
            tempfile.TemporaryDirectory(prefix="mkv-pull-sizes-") as tmp,
            contextlib.closing(tb.RawTcpRounds()) as raw,
        ):
            pull, base = measure_pulls(
                Path(tmp), "tcp", chunks, args.rounds, {"raw": raw}, size * MIB
            )
        report.add(
            Result(f"pull_{size}mib", pull, "GB/s", size * MIB, "raw_tcp_blocking", base["raw"])
        )
        report.meta[f"chunks_per_round_{size}mib"] = chunks
    print(report.table())
    if args.json:
        report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
