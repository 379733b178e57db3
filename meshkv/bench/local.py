"""``meshkv bench local``: the CPU and SSD tiers measured through a real agent process.

Everything goes through the same path an engine uses: a separate ``meshkv agent``
process, the ``AgentClient`` over the Unix socket, and copies into / out of the shared
arena. Each number is compared with a baseline taken in the same run (the machine is
noisy; compare ratios, not absolute values). The client maps the arena up front
(``AgentClient.map_arena()``, ``MAP_POPULATE``: ~0.25 s per GiB): that is a fixed start-up
cost of an engine worker, not a per-request cost, so it is kept out of every clock.

* ``store`` (per chunk size: 2, 16, 32 MiB): one batch = ``--batch-mib`` of chunks; per
  batch one ``reserve`` for all its keys, a numpy ``copyto`` of each chunk from process
  memory into its arena slot, one ``commit`` without checksums. GB/s is the median over
  batches. The agent runs with its defaults, as in production: no ``--verify-reads``, no
  write-through, so a commit defers the chunk's xxh3 until the chunk leaves the arena
  (docs/tiers.md, "Checksums") and no hash competes with the copy; the arena is large
  enough that eviction runs but never waits. Baseline ``memcpy``: the same
  ``copyto`` of the same bytes between two warm process buffers.
* ``load``: one ``read`` for a batch's keys, a ``copyto`` of each pinned slot into process
  memory, one ``release``. Same baseline.
* ``lookup_p50`` / ``lookup_p99``: round trip of a 64-key ``lookup`` (all keys stored), in
  µs, over ``--lookups`` calls after a warm-up.
* ``ssd_write``: a second agent runs with ``--write-through`` and an SSD directory. The
  clock starts before the first reserve and stops when the agent reports every chunk on
  SSD (checksummed, written to a temp file, fsynced, renamed): durable bytes per second.
  The writer never has more chunks in flight than the tier's write queue, so no write is
  refused (the run fails if one is). Baseline ``raw_pwrite``: ``meshkv.bench.ssd_raw``
  (``os.pwrite`` + ``fsync`` of one file per chunk) in the same directory, the mean of a
  raw run right before the agent's write and one right after its read (the disk's speed
  drifts; both raw GB/s are in ``meta.raw_ssd_gbps_*``). Same fsync policy on both sides:
  one ``fsync`` per file, nothing else (the agent's directory is not fsynced); the agent
  writes straight from the arena slot (``pwritev`` of header + slot, no copy) and adds
  only what crash safety needs: a temp file, a 68-byte header, a rename, and the xxh3 it
  must compute before a chunk leaves the arena. Both sides start from files not in the
  page cache (fresh files) and end with fsync, so neither is timing memory.
* ``ssd_read``: that agent is restarted (its CPU tier starts empty, the SSD scan finds the
  chunks), the page cache of every chunk file is dropped (``POSIX_FADV_DONTNEED``), then
  batches are ``read`` (promoted from disk into the arena, checksum verified, pinned) and
  released. Baseline ``raw_pread``: ``os.preadv`` of the same sizes after the same drop
  (mean of before and after, likewise). The agent reads with ``ssd_workers`` (2) threads,
  the raw baseline with one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from meshkv.bench.report import Report, Result
from meshkv.bench.ssd_raw import drop_file_cache, measure_raw
from meshkv.client import AgentClient
from meshkv.errors import NoSpace
from meshkv.launch import AgentProcess

MiB = 1 << 20
GiB = 1 << 30
CHUNK_SIZES_MIB = (2, 16, 32)
SSD_WRITE_QUEUE = 32
"""The bench agent's ``[store] ssd_write_queue``; the writer keeps fewer chunks in flight."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu-gb", type=float, default=2.0, help="CPU tier of the bench agent, GiB"
    )
    parser.add_argument(
        "--batch-mib", type=int, default=64, help="bytes per reserve/commit or read batch, MiB"
    )
    parser.add_argument("--batches", type=int, default=24, help="batches per measurement")
    parser.add_argument("--lookups", type=int, default=5000, help="64-key lookups to time")
    parser.add_argument(
        "--ssd-dir",
        default=None,
        help="directory on the disk to measure (default: a fresh temp dir, removed after)",
    )
    parser.add_argument(
        "--ssd-mib", type=int, default=256, help="bytes written per chunk size in the SSD test"
    )
    parser.add_argument("--skip-ssd", action="store_true", help="measure the CPU tier only")
    parser.add_argument(
        "--only",
        choices=("lookup", "cpu", "ssd"),
        default=None,
        help="run one part only (default: all)",
    )


@contextlib.contextmanager
def running(agent: AgentProcess) -> Iterator[AgentProcess]:
    """The agent started for the ``with`` block, stopped (SIGTERM) after it; its files go
    with the bench's work directory."""
    agent.start(timeout=60.0)
    try:
        yield agent
    finally:
        agent.stop(timeout=60.0)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _keys(prefix: str, start: int, count: int) -> list[bytes]:
    return [f"{prefix}{i:012d}".encode()[:16].ljust(16, b"-") for i in range(start, start + count)]


def _chunks(size: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(size)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(count)]


WAIT_LIMIT_S = 120.0
"""No wait in the benchmark (free slots, SSD catching up) may exceed this."""


def _check(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise RuntimeError(f"gave up after {WAIT_LIMIT_S:.0f} s waiting for {what}")


def _store_batch(client: AgentClient, keys: list[bytes], src: list[np.ndarray]) -> float:
    """Store one batch; returns the seconds spent copying (the rest is the two RPCs)."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    while True:
        try:
            reservations = client.reserve(keys, [a.nbytes for a in src])
            break
        except NoSpace:  # slots still held for background hashing; let it catch up
            _check(deadline, "free arena slots")
            time.sleep(0.001)
    t0 = time.perf_counter()
    for res, arr in zip(reservations, src, strict=True):
        if res is not None:
            np.copyto(np.frombuffer(res.view, dtype=np.uint8), arr)
    copied = time.perf_counter() - t0
    del res, reservations  # views into the arena
    client.commit(keys, [0] * len(keys))
    return copied


def _load_batch(client: AgentClient, keys: list[bytes], dst: list[np.ndarray]) -> float:
    """Load one batch; returns the seconds spent copying (the rest is the two RPCs)."""
    leases = client.read(keys)
    t0 = time.perf_counter()
    for lease, arr in zip(leases, dst, strict=True):
        if lease is None:
            raise RuntimeError("a chunk stored by the benchmark was not served")
        np.copyto(arr, np.frombuffer(lease.view, dtype=np.uint8))
    copied = time.perf_counter() - t0
    client.release([x for x in leases if x is not None])
    return copied


def _wait_idle(client: AgentClient) -> None:
    """Wait until the agent has no background checksums pending (a quiet baseline)."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    while client.stats().get("checksums_pending", 0):
        _check(deadline, "background checksums")
        time.sleep(0.01)


def measure_lookup(client: AgentClient, args: argparse.Namespace, report: Report) -> None:
    keys = _keys("lk-", 0, 64)
    for key in keys:
        client.put(key, b"\0" * 4096)
    _wait_idle(client)
    for _ in range(200):
        client.lookup(keys)
    rtts = []
    for _ in range(args.lookups):
        t0 = time.perf_counter()
        reply = client.lookup(keys)
        rtts.append(time.perf_counter() - t0)
        if reply.prefix != 64:
            raise RuntimeError("lookup did not find the stored prefix")
    rtts.sort()
    report.add(Result("lookup_p50", rtts[len(rtts) // 2] * 1e6, "us", None))
    report.add(Result("lookup_p99", rtts[int(len(rtts) * 0.99)] * 1e6, "us", None))


def _memcpy(src: list[np.ndarray], dst: list[np.ndarray]) -> None:
    for s, d in zip(src, dst, strict=True):
        np.copyto(d, s)


def measure_cpu(client: AgentClient, args: argparse.Namespace, report: Report) -> None:
    """Store and load per chunk size; each batch is timed right after a memcpy batch of the
    same bytes, so the baseline sees the same machine noise (medians of both)."""
    batch_bytes = args.batch_mib * MiB
    for size_mib in CHUNK_SIZES_MIB:
        size = size_mib * MiB
        per_batch = max(1, batch_bytes // size)
        src = _chunks(size, per_batch)
        dst = [np.empty(size, dtype=np.uint8) for _ in range(per_batch)]
        nbytes = size * per_batch
        _wait_idle(client)

        base_store: list[float] = []
        store: list[float] = []
        store_copy: list[float] = []
        last: list[bytes] = []
        for b in range(args.batches + 2):
            t0 = time.perf_counter()
            _memcpy(src, dst)
            base_store.append(_gbps(nbytes, time.perf_counter() - t0))
            last = _keys(f"s{size_mib}-", b * per_batch, per_batch)
            t0 = time.perf_counter()
            copied = _store_batch(client, last, src)
            store.append(_gbps(nbytes, time.perf_counter() - t0))
            store_copy.append(_gbps(nbytes, copied))
        _wait_idle(client)

        base_load: list[float] = []
        load: list[float] = []
        load_copy: list[float] = []
        for _ in range(args.batches + 2):
            t0 = time.perf_counter()
            _memcpy(src, dst)
            base_load.append(_gbps(nbytes, time.perf_counter() - t0))
            t0 = time.perf_counter()
            copied = _load_batch(client, last, dst)
            load.append(_gbps(nbytes, time.perf_counter() - t0))
            load_copy.append(_gbps(nbytes, copied))
        if not all(np.array_equal(s, d) for s, d in zip(src, dst, strict=True)):
            raise RuntimeError("loaded bytes differ from stored bytes")

        med = statistics.median
        report.add(Result("store", med(store[2:]), "GB/s", size, "memcpy", med(base_store[2:])))
        report.add(Result("load", med(load[2:]), "GB/s", size, "memcpy", med(base_load[2:])))
        # Where the time goes: the copy alone (GB/s) vs the whole batch with its two RPCs.
        report.meta[f"copy_only_gbps_{size_mib}mib"] = {
            "store": round(med(store_copy[2:]), 3),
            "load": round(med(load_copy[2:]), 3),
        }


def _ssd_stats(client: AgentClient) -> dict[str, Any]:
    stats = client.stats()
    ssd: dict[str, Any] = stats["tiers"]["ssd"]
    ssd["writes_refused"] = stats.get("ssd_writes_refused", 0)
    return ssd


def measure_ssd(workdir: Path, ssd_dir: Path, args: argparse.Namespace, report: Report) -> None:
    """Per chunk size, back to back: the raw baseline, then the agent's write and read."""
    config = workdir / "ssd-agent.toml"
    config.write_text(f"[store.ssd]\nwrite_queue_depth = {SSD_WRITE_QUEUE}\n")
    agent = AgentProcess(
        name="bench-ssd",
        cpu_bytes=int(args.cpu_gb * GiB),
        ssd_dir=ssd_dir,
        args=["--config", str(config), "--write-through"],
        log_level="warning",
    )
    try:
        _measure_ssd_sizes(agent, ssd_dir, args, report)
    finally:
        agent.cleanup()


def _measure_ssd_sizes(
    agent: AgentProcess, ssd_dir: Path, args: argparse.Namespace, report: Report
) -> None:
    for size_mib in CHUNK_SIZES_MIB:
        size = size_mib * MiB
        count = max(2, args.ssd_mib * MiB // size)
        (raw_before,) = measure_raw(str(ssd_dir), [size], count)
        src = _chunks(size, 1)[0]
        keys = _keys(f"d{size_mib}-", 0, count)
        with running(agent), agent.client(timeout=30.0) as client:
            start = _ssd_stats(client)
            on_ssd = base = start["chunks"]
            deadline = time.monotonic() + WAIT_LIMIT_S
            t0 = time.perf_counter()
            for i, key in enumerate(keys):
                # Never more in flight than the tier's write queue: nothing is refused.
                while i - (on_ssd - base) >= SSD_WRITE_QUEUE - 1:
                    _check(deadline, "SSD writes")
                    time.sleep(0.002)
                    on_ssd = _ssd_stats(client)["chunks"]
                _store_batch(client, [key], [src])
            while on_ssd - base < count:
                _check(deadline, "SSD writes")
                time.sleep(0.002)
                on_ssd = _ssd_stats(client)["chunks"]
            seconds = time.perf_counter() - t0
            if _ssd_stats(client)["writes_refused"] != start["writes_refused"]:
                raise RuntimeError("the SSD tier refused writes; the write number is invalid")
        write_gbps = _gbps(size * count, seconds)
        # Restart: an empty CPU tier; the SSD scan finds the chunks. Drop their cached pages.
        with running(agent), agent.client(timeout=30.0) as client:
            client.map_arena()  # connect and map the arena before the clock starts
            for path in ssd_dir.rglob("*.mkv"):
                drop_file_cache(str(path))
            per = max(1, args.batch_mib * MiB // size)
            t0 = time.perf_counter()
            for i in range(0, count, per):
                leases = client.read(keys[i : i + per])
                missing = sum(x is None for x in leases)
                client.release([x for x in leases if x is not None])
                del leases
                if missing:
                    raise RuntimeError(f"{missing} chunks written to SSD were not served")
            seconds = time.perf_counter() - t0
        read_gbps = _gbps(size * count, seconds)
        # The disk drifts several-fold within minutes here: the baseline is the mean of a
        # raw run right before and one right after the agent's write + read.
        (raw_after,) = measure_raw(str(ssd_dir), [size], count)
        raw_write = (raw_before.write_gbps + raw_after.write_gbps) / 2
        raw_read = (raw_before.read_gbps + raw_after.read_gbps) / 2
        report.add(Result("ssd_write", write_gbps, "GB/s", size, "raw_pwrite", raw_write))
        report.add(Result("ssd_read", read_gbps, "GB/s", size, "raw_pread", raw_read))
        report.meta[f"raw_ssd_gbps_{size_mib}mib"] = {
            "write_before": round(raw_before.write_gbps, 3),
            "write_after": round(raw_after.write_gbps, 3),
            "read_before": round(raw_before.read_gbps, 3),
            "read_after": round(raw_after.read_gbps, 3),
        }


def run(args: argparse.Namespace) -> int:
    report = Report("local")
    report.meta.update(
        cpus=os.cpu_count(),
        batch_bytes=args.batch_mib * MiB,
        batches=args.batches,
        cpu_tier_bytes=int(args.cpu_gb * (1 << 30)),
        loadavg_start=os.getloadavg()[0],
    )
    workdir = Path(tempfile.mkdtemp(prefix="mkv-bench-", dir="/tmp"))
    ssd_dir = Path(args.ssd_dir) if args.ssd_dir else workdir / "ssd"
    ssd_dir.mkdir(parents=True, exist_ok=True)
    try:
        if args.only != "ssd":
            cpu_agent = AgentProcess(
                name="bench-cpu", cpu_bytes=int(args.cpu_gb * GiB), log_level="warning"
            )
            try:
                with running(cpu_agent), cpu_agent.client(timeout=30.0) as client:
                    client.map_arena()  # a fixed start-up cost (MAP_POPULATE), not per request
                    if args.only in (None, "lookup"):
                        measure_lookup(client, args, report)
                    if args.only in (None, "cpu"):
                        measure_cpu(client, args, report)
            finally:
                cpu_agent.cleanup()
        if not args.skip_ssd and args.only in (None, "ssd"):
            report.meta["ssd_dir"] = str(ssd_dir)
            measure_ssd(workdir, ssd_dir, args, report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if args.ssd_dir:
            for path in ssd_dir.rglob("*.mkv"):
                path.unlink(missing_ok=True)
    report.meta["loadavg_end"] = os.getloadavg()[0]
    print(report.table())
    print(
        f"load average (1 min): {report.meta['loadavg_start']:.1f} at start, "
        f"{report.meta['loadavg_end']:.1f} at end; ratios are only meaningful on a quiet host"
    )
    report.write(args.json)
    return 0
