"""Coverage-guided fuzzing of every decoder with atheris (libFuzzer), ``make fuzz``.

    python -m tests.fuzz.run --seconds 120 [--targets a,b] [--json FILE]

Each target of ``tests/fuzz/targets.py`` runs in its own process for ``--seconds`` with
meshkv's modules instrumented, starting from a seed corpus of valid encodings (so the
mutations begin past the framing). Prints one row per target: executions, coverage
(libFuzzer's ``cov``/``ft``), and findings (inputs that broke the contract are saved under
the artifacts directory, named by libFuzzer). Exits 1 if any target found something.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def seeds() -> dict[str, list[bytes]]:
    """Valid inputs per target (the hypothesis module builds the same shapes)."""
    import msgpack  # noqa: PLC0415

    from meshkv.chunk import RecordHeader  # noqa: PLC0415
    from meshkv.protocol import encode  # noqa: PLC0415
    from meshkv.transport.framing import Flags, MsgKind, encode_head  # noqa: PLC0415
    from tests.fuzz.test_decoders import KIND_OF, MESSAGES, RECORD, VALID_PARAMS  # noqa: PLC0415

    def frame(kind: MsgKind, header: dict[str, Any], payload: bytes = b"") -> bytes:
        raw = msgpack.packb(header, use_bin_type=True)
        return encode_head(kind, Flags.NONE, 1, len(raw), len(payload)) + raw + payload

    mesh = [frame(KIND_OF[type(m)], {"m": m.to_wire(), "src": "127.0.0.1:1"}) for m in MESSAGES]
    key = b"\x01" * 16
    local = [
        encode({"op": "hello", "id": 1, "min_version": 1, "max_version": 1,
                "namespace": {"model": "m"}}),
        encode({"op": "reserve", "id": 2, "keys": [key], "sizes": [64]}),
        encode({"op": "commit", "id": 3, "keys": [key], "tokens": [16], "checksums": [1]}),
        encode({"op": "read", "id": 4, "keys": [key], "wait": 0.5}),
        encode({"op": "hold", "id": 5, "keys": [key],
                "transfer": {"id": "t", "hold": 5.0, "push_to": "n2"}}),
    ]  # fmt: skip
    payload = b"\x07" * 32
    record = RecordHeader(b"\x02" * 16, b"\x00" * 16, 4, len(payload), 0)
    return {
        "local_frames": local,
        "peer_frames": mesh
        + [
            frame(MsgKind.CHUNK_GET, {"ns": key, "key": key, "wait": 0.5}),
            frame(MsgKind.CHUNK_PUSH, {"push": 1, "record": RECORD.pack()}, b"\x00" * 64),
        ],
        "gossip": [msgpack.packb(m.to_wire(), use_bin_type=True) for m in MESSAGES],
        "gossip_raw": [msgpack.packb({"m": m.to_wire()}, use_bin_type=True) for m in MESSAGES],
        "handshake": [
            frame(MsgKind.HELLO, {"node": "x", "min": 1, "max": 2, "nonce": b"\x00" * 16})
            + frame(MsgKind.AUTH, {"mac": b"\x00" * 32})
        ],
        "record_header": [RECORD.pack()],
        "ssd_file": [record.pack() + payload],
        "kv_transfer_params": [json.dumps(VALID_PARAMS).encode()],
        "http_prefix": [b'{"token_ids": [1, 2, 3], "model": "m"}'],
        "toml_config": [
            b'[store.cpu]\ncapacity_bytes = 67108864\neviction = "lru"\n',
            b'http = "127.0.0.1:0"\n[mesh]\npeer_port = 0\n',
        ],
    }


def run_one(name: str, seconds: int, corpus: Path, artifacts: Path) -> int:
    """In this process: fuzz ``name`` (libFuzzer takes over; returns its exit status)."""
    import atheris  # noqa: PLC0415

    with atheris.instrument_imports(include=["meshkv"]):
        import meshkv.cli.agent_cmd  # noqa: F401, PLC0415 (targets import these lazily)
        import meshkv.tiers.ssd  # noqa: F401, PLC0415
        from tests.fuzz import targets  # noqa: PLC0415

    target = targets.TARGETS[name]
    # libFuzzer ends the process from C, past Python's atexit: the targets' temporary
    # files go under the run's work dir instead of /tmp
    tempfile.tempdir = str(artifacts.parent / "tmp")
    os.makedirs(tempfile.tempdir, exist_ok=True)
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds().get(name, [])):
        (corpus / f"seed-{i}").write_bytes(seed)
    artifacts.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={seconds}",
        "-print_final_stats=1",
        "-rss_limit_mb=4096",
        "-timeout=10",
        f"-artifact_prefix={artifacts}/{name}-",
    ]
    atheris.Setup(argv, target)
    atheris.Fuzz()
    return 0


_STATS = re.compile(r"stat::(\w+):\s+(\d+)")
_COV = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+)")


def run_all(names: list[str], seconds: int, workdir: Path) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "tests.fuzz.run", "--one", name, "--seconds", str(seconds),
             "--workdir", str(workdir)],
            capture_output=True,
            text=True,
            timeout=seconds * 3 + 120,
        )  # fmt: skip
        log = proc.stderr
        (workdir / f"{name}.log").write_text(log)
        stats = {k: int(v) for k, v in _STATS.findall(log)}
        cov = _COV.findall(log)
        findings = sorted(p.name for p in (workdir / "artifacts").glob(f"{name}-*"))
        rows.append(
            {
                "target": name,
                "seconds": round(time.monotonic() - started),
                "executions": stats.get("number_of_executed_units", 0),
                "coverage": int(cov[-1][1]) if cov else None,
                "features": int(cov[-1][2]) if cov else None,
                "corpus": len(list((workdir / "corpus" / name).iterdir())),
                "findings": findings,
                "exit": proc.returncode,
            }
        )
        r = rows[-1]
        print(
            f"{name:20s} {r['executions']:>10,d} execs  cov {r['coverage']}  "
            f"corpus {r['corpus']}  findings {len(findings)}  exit {r['exit']}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=120, help="per target (default 120)")
    p.add_argument("--targets", default="", help="comma-separated (default: all)")
    p.add_argument("--json", help="write the result rows here")
    p.add_argument(
        "--workdir", help="corpus, artifacts, logs (default: a temp dir, gone if nothing is found)"
    )
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seconds <= 0:
        p.error(f"--seconds must be positive, got {args.seconds}")
    if importlib.util.find_spec("atheris") is None:
        p.error("atheris is not installed: `make fuzz` installs it (atheris==3.0.0)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mkv-fuzz-"))
    if args.one:
        return run_one(args.one, args.seconds, workdir / "corpus" / args.one, workdir / "artifacts")
    from tests.fuzz.targets import TARGETS  # noqa: PLC0415

    names = [n for n in args.targets.split(",") if n] or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    print(f"fuzzing {len(names)} targets for {args.seconds} s each; work dir {workdir}")
    rows = run_all(names, args.seconds, workdir)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    bad = [r["target"] for r in rows if r["findings"] or r["exit"] != 0]
    if bad:
        print(f"FINDINGS in {', '.join(bad)}: see {workdir}/artifacts and the logs")
        return 1
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)  # nothing found: nothing worth keeping
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
