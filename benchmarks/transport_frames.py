"""The TCP transport alone (no store, no agent): chunk responses between two processes,
against the raw loopback socket of the same run.

    python -m benchmarks.transport_frames [--chunk-mib 2] [--chunks 12] [--rounds 30]
                                          [--connections 1,4] [--gap-ms 0] [--json F]

A server process answers every ``CHUNK_GET`` with ``--chunk-mib`` MiB from one buffer; the
client (uvloop, like the agent) sends ``--chunks`` requests at once over ``--connections``
connections, each payload landing in its own slice of one buffer, and times the round.
Right before each round the raw blocking-socket baseline moves the same chunks over its
own connection (``transport_baselines.raw_tcp_session``: one request per chunk); both
servers and all connections live for the whole run, and ``--gap-ms`` of idle precede each
side's timed part alike. This separates what the framing, the session and the event loop
cost from what the agents add on top (``benchmarks.pull_sizes`` measures the whole pull).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from meshkv.bench import transport_baselines as tb
from meshkv.bench.report import Report, Result
from meshkv.transport import Message, MsgKind, PeerInfo, TcpTransport, TransportConfig

MIB = 1 << 20


def _serve(chunk_bytes: int, secret: bytes) -> None:
    async def main() -> None:
        data = memoryview(os.urandom(chunk_bytes))
        transport = TcpTransport(TransportConfig(secret, "frames-server"))

        async def handler(peer: PeerInfo, msg: Message) -> Message:
            return Message(MsgKind.CHUNK_DATA, {"found": True}, payload=data)

        listener = await transport.listen("127.0.0.1", 0, handler)
        print(listener.address.rsplit(":", 1)[1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF

    uvloop.run(main())


def measure(
    chunk_bytes: int, chunks: int, rounds: int, connections: int, gap_s: float
) -> tuple[float, float]:
    """(transport GB/s, raw socket GB/s) over ``rounds`` timed rounds (after one warm-up).

    Both sides keep their server process and connections for the whole run, and each
    side's timed part starts ``gap_s`` after the other's ended (ABAB, the same pause
    before both: an idle gap slows the next burst on this VM)."""
    secret = os.urandom(24)
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.transport_frames", "serve", str(chunk_bytes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, MESHKV_FRAMES_SECRET=secret.hex()),
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().decode().strip()
        if not line.isdigit():
            raise RuntimeError(f"frame server did not start (said {line!r})")
        port = int(line)

        async def main(raw: Callable[[int], float]) -> tuple[float, float]:
            loop = asyncio.get_running_loop()
            transport = TcpTransport(TransportConfig(secret, "frames-client"))
            conns = [
                await transport.connect(f"127.0.0.1:{port}", loop.time() + 10)
                for _ in range(connections)
            ]
            buf = memoryview(bytearray(chunk_bytes * chunks))

            async def one(i: int) -> None:
                def into(kind: MsgKind, header: Any, size: int) -> memoryview:
                    return buf[i * chunk_bytes : (i + 1) * chunk_bytes]

                reply = await conns[i % connections].request(
                    MsgKind.CHUNK_GET, {}, deadline=loop.time() + 30, recv_into=into
                )
                if reply.payload is None or len(reply.payload) != chunk_bytes:
                    raise RuntimeError("a chunk arrived short")

            raw_s = frames_s = 0.0
            for round_no in range(rounds + 1):  # round 0 warms both up; not counted
                time.sleep(gap_s)
                raw_round = raw(chunks)
                time.sleep(gap_s)
                start = time.perf_counter()
                await asyncio.gather(*(one(i) for i in range(chunks)))
                if round_no:
                    frames_s += time.perf_counter() - start
                    raw_s += raw_round
            await transport.close()
            moved = chunk_bytes * chunks * rounds
            return moved / frames_s / 1e9, moved / raw_s / 1e9

        with tb.raw_tcp_session(chunk_bytes) as raw:
            return uvloop.run(main(raw))
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the server process this benchmark starts for itself
        try:
            secret = bytes.fromhex(os.environ.get("MESHKV_FRAMES_SECRET", ""))
        except ValueError:
            secret = b""
        if len(argv) != 2 or not argv[1].isdigit() or len(secret) < 16:
            print("serve is started by the benchmark itself: serve BYTES, with "
                  "MESHKV_FRAMES_SECRET set (hex, 16+ bytes)", file=sys.stderr)  # fmt: skip
            return 2
        _serve(int(argv[1]), secret)
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transport_frames")
    parser.add_argument("--chunk-mib", type=int, default=2, help="payload of each response")
    parser.add_argument("--chunks", type=int, default=12, help="requests in flight a round")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per setting")
    parser.add_argument("--connections", default="1,4", help="connections, comma-separated")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="idle before each timed part")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    try:
        counts = [int(x) for x in args.connections.split(",") if x]
    except ValueError:
        parser.error(f"--connections must be whole numbers separated by commas, got "
                     f"{args.connections!r}")  # fmt: skip
    if not counts or min(counts) <= 0 or min(args.chunk_mib, args.chunks, args.rounds) <= 0:
        parser.error("--chunk-mib, --chunks, --rounds and --connections must be positive")
    if not 0 <= args.gap_ms <= 10_000:
        parser.error(f"--gap-ms must be between 0 and 10000, got {args.gap_ms}")
    report = Report("transport_frames")
    report.meta.update(
        chunk_mib=args.chunk_mib, chunks=args.chunks, rounds=args.rounds, gap_ms=args.gap_ms
    )
    for count in counts:
        frames, raw = measure(
            args.chunk_mib * MIB, args.chunks, args.rounds, count, args.gap_ms / 1000
        )
        report.add(
            Result(f"frames_{count}conn", frames, "GB/s", args.chunk_mib * MIB,
                   "raw_tcp_blocking", raw)
        )  # fmt: skip
    print(report.table())
    if args.json:
        report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
