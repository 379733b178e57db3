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
* ``lookup_tp8_p50`` / ``lookup_tp8_p99``: a tensor-parallel (TP=8) engine's lookup: the
  same 64 positions, naming the 7 other ranks' keys (each stored under its rank's
  namespace) in the same call, so the agent checks 512 keys. Baseline: the 64-key lookup.
* ``lookup_p50_under_load`` / ``lookup_p99_under_load``: the same lookups while another
  process stores into the same agent without pause (2 MiB chunks in 16 MiB batches:
  reserve, copy, commit, as an engine worker saving a prefill), the way a scheduler looks
  up while the workers save. The clock starts once the load has stored as many bytes as
  the arena holds (so every store evicts, as on an agent that has run for a while: the
  first fill of a fresh arena is slower for everyone and happens once; its time is
  ``meta.store_load_fill_s``), after 0.5 s of untimed lookups (the idle measurement has
  its warm-up too). The store rate reached meanwhile is in
  ``meta.store_load_gbps``. Baseline: the idle lookup of the same run.
* ``prefix_query_p50`` / ``prefix_query_p99``: round trip of ``POST /v1/prefix`` (what a
  cache-aware router asks every node per request) for a 4,096-token prompt whose 16 chunks
  of 256 tokens are all held, over one kept-alive HTTP connection on loopback, in µs; the
  answer is checked. Target: p99 <= 2 ms.
* ``ssd_write``: a second agent runs with ``--write-through`` and an SSD directory. The
  clock starts before the first reserve and stops when the agent reports every chunk on
  SSD (checksummed, written to a temp file, fsynced, renamed): durable bytes per second.
  The writer never has more chunks in flight than the tier's write queue, so no write is
  refused (the run fails if one is). Baseline ``raw_pwrite``: ``meshkv.bench.ssd_raw``
  (``os.pwrite`` + ``fsync`` of one file per chunk, through the page cache) in the same
  directory; it deletes its files after each round, so its page-cache pages are reused,
  which a cache whose files stay cannot do (the harder baseline). Second baseline
  ``raw_pwrite_direct`` (result ``ssd_write_vs_direct``): the same with ``O_DIRECT``
  from page-aligned memory, the way the tier writes by default: the device's rate. The
  sides alternate in rounds (raw, raw direct, agent, ...: the disk's speed drifts
  several-fold within minutes here, so slow minutes hit all); each side's GB/s is its
  total bytes over its total time. Same fsync policy on every side: one ``fsync`` per
  file, nothing else (the agent's directory is not fsynced); the agent writes straight
  from the arena slot (``O_DIRECT``: header block, slot, no copy) and adds only what crash
  safety needs: a temp file, a 4 KiB header block, a rename, and the xxh3 it must compute
  before a chunk leaves the arena. Every side writes fresh files and ends with fsync, so
  none is timing memory.
* ``ssd_read``: that agent is restarted (its CPU tier starts empty, the SSD scan finds the
  chunks), the page cache of every chunk file is dropped (``POSIX_FADV_DONTNEED``), then
  batches are ``read`` (promoted from disk into the arena, checksum verified, pinned) and
  released. Baseline ``raw_pread``: ``os.preadv`` of the same sizes after the same drop,
  alternating in rounds likewise. Both sides use the same number of threads (the
  agent's ``ssd.workers``, 2): the raw baseline writes and reads with as many, so neither
  side keeps more requests in flight on the device than the other.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from meshkv.bench.args import positive_float, positive_int
from meshkv.bench.report import Report, Result
from meshkv.bench.ssd_raw import drop_file_cache, measure_raw
from meshkv.client import AgentClient
from meshkv.errors import NoSpace
from meshkv.launch import AgentProcess

MiB = 1 << 20
GiB = 1 << 30
UNDER_LOAD_WARMUP_S = 0.5
"""Untimed lookups under the load before its clock starts."""
CHUNK_SIZES_MIB = (2, 16, 32)
SSD_WRITE_QUEUE = 32
"""The bench agent's ``[store] ssd_write_queue``; the writer keeps fewer chunks in flight."""
SSD_WORKERS = 2
"""The agent's ``[store.ssd] workers`` (its default); the raw baseline uses as many threads."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu-gb", type=positive_float, default=2.0, help="CPU tier of the bench agent, GiB"
    )
    parser.add_argument(
        "--batch-mib",
        type=positive_int,
        default=64,
        help="bytes per reserve/commit or read batch, MiB",
    )
    parser.add_argument("--batches", type=positive_int, default=24, help="batches per measurement")
    parser.add_argument("--lookups", type=positive_int, default=5000, help="64-key lookups to time")
    parser.add_argument(
        "--ssd-dir",
        default=None,
        help="a directory on the disk to measure; the bench works in a fresh subdirectory "
        "of it and removes that after (default: under /tmp)",
    )
    parser.add_argument(
        "--ssd-mib",
        type=positive_int,
        default=256,
        help="bytes written per chunk size in the SSD test",
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
    rtts = _time_lookups(client, keys, args.lookups)
    report.add(Result("lookup_p50", rtts[len(rtts) // 2] * 1e6, "us", None))
    report.add(Result("lookup_p99", rtts[int(len(rtts) * 0.99)] * 1e6, "us", None))
    measure_lookup_tp8(client, keys, args, report, rtts)


def measure_lookup_tp8(
    client: AgentClient,
    keys: list[bytes],
    args: argparse.Namespace,
    report: Report,
    idle: list[float],
) -> None:
    """A TP=8 engine's lookup: the same 64 positions for rank 0 and, named in the same
    call, the 7 other ranks' keys under their namespaces (all stored), against the plain
    64-key lookup of the same run."""
    from meshkv.chunk import Namespace  # noqa: PLC0415

    ranks = []
    for rank in range(1, 8):
        ns = Namespace(model="bench-tp", tp_size=8, tp_rank=rank)
        rank_keys = _keys(f"r{rank}-", 0, 64)
        with AgentClient(client.socket_path, namespace=ns, timeout=30.0) as writer:
            for key in rank_keys:
                writer.put(key, b"\0" * 4096)
        ranks.append((ns.digest(), rank_keys))
    _wait_idle(client)
    for _ in range(200):
        client.lookup(keys, ranks=ranks)
    rtts = []
    for _ in range(args.lookups):
        t0 = time.perf_counter()
        reply = client.lookup(keys, ranks=ranks)
        rtts.append(time.perf_counter() - t0)
        if reply.prefix != len(keys):
            raise RuntimeError("TP lookup did not find every rank's stored prefix")
    rtts.sort()
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        report.add(
            Result(f"lookup_tp8_{name}", rtts[int(len(rtts) * q)] * 1e6, "us", None,
                   f"64-key lookup_{name}", idle[int(len(idle) * q)] * 1e6)
        )  # fmt: skip


def _store_forever(socket_path: str, stop: Any, stored: Any) -> None:
    """In a child process: store 16 MiB batches of 2 MiB chunks into the agent until
    ``stop`` is set; ``stored`` counts the bytes committed (an engine worker saving)."""
    src = _chunks(2 * MiB, 8)
    with AgentClient(socket_path, timeout=30.0) as client:
        client.map_arena()
        b = 0
        while not stop.is_set():
            _store_batch(client, _keys("ld-", b * 8, 8), src)
            with stored.get_lock():
                stored.value += 16 * MiB
            b += 1


def _time_lookups(client: AgentClient, keys: list[bytes], n: int) -> list[float]:
    rtts = []
    for _ in range(n):
        t0 = time.perf_counter()
        reply = client.lookup(keys)
        rtts.append(time.perf_counter() - t0)
        if reply.prefix != len(keys):
            raise RuntimeError("lookup did not find the stored prefix")
    rtts.sort()
    return rtts


def measure_lookup_under_load(
    client: AgentClient, socket_path: str, args: argparse.Namespace, report: Report
) -> None:
    """64-key lookups while a second process keeps storing into the same agent."""
    import multiprocessing  # noqa: PLC0415 - only this measurement needs a child process

    keys = _keys("lk-", 0, 64)  # stored by measure_lookup
    # The load fills the arena and evicts; a read lease keeps the looked-up chunks resident.
    pins = [x for x in client.read(keys) if x is not None]
    ctx = multiprocessing.get_context("spawn")
    stop, stored = ctx.Event(), ctx.Value("q", 0)
    child = ctx.Process(target=_store_forever, args=(socket_path, stop, stored), daemon=True)
    child.start()
    try:
        deadline = time.monotonic() + WAIT_LIMIT_S
        started = time.perf_counter()
        full = int(args.cpu_gb * GiB)
        while stored.value < full:  # steady state before the clock starts: the arena is full
            _check(deadline, "the store load to fill the arena")
            if not child.is_alive():
                raise RuntimeError(f"the store load exited with {child.exitcode}")
            time.sleep(0.01)
        fill_s = time.perf_counter() - started
        # As the idle measurement, lookups warm up first: the first ~0.2 s of lookups after
        # the waiting above run at p99 ~1 ms while the scheduler settles three busy
        # processes on two vCPUs (docs/benchmarks.md, runs of 2026-12-05, item 14).
        warm_end = time.perf_counter() + UNDER_LOAD_WARMUP_S
        while time.perf_counter() < warm_end:
            client.lookup(keys)
        before, t0 = stored.value, time.perf_counter()
        rtts = _time_lookups(client, keys, args.lookups)
        gbps = _gbps(stored.value - before, time.perf_counter() - t0)
    finally:
        stop.set()
        child.join(30)
        if child.is_alive():
            child.kill()
        client.release(pins)
        del pins
    idle = {r.name: r.value for r in report.results}
    report.add(
        Result("lookup_p50_under_load", rtts[len(rtts) // 2] * 1e6, "us", None,
               "idle lookup_p50", idle.get("lookup_p50"))
    )  # fmt: skip
    report.add(
        Result("lookup_p99_under_load", rtts[int(len(rtts) * 0.99)] * 1e6, "us", None,
               "idle lookup_p99", idle.get("lookup_p99"))
    )  # fmt: skip
    report.meta["store_load_gbps"] = round(gbps, 3)
    report.meta["store_load_fill_s"] = round(fill_s, 3)


def measure_prefix_query(agent: AgentProcess, args: argparse.Namespace, report: Report) -> None:
    """``POST /v1/prefix`` for a 4k-token prompt, all of it held, over one connection."""
    import http.client  # noqa: PLC0415
    import json  # noqa: PLC0415
    from urllib.parse import urlsplit  # noqa: PLC0415

    from meshkv.chunk import Namespace, chunk_keys  # noqa: PLC0415

    ns = Namespace(model="bench-prefix", num_layers=8, kv_heads=4, head_size=64)
    tokens = [int(t) for t in np.random.default_rng(7).integers(3, 32000, 4096)]
    with AgentClient(agent.socket_path, namespace=ns, chunk_tokens=256, timeout=30.0) as client:
        for key in chunk_keys(ns.digest(), tokens, 256):
            client.put(key, b"\0" * 4096, num_tokens=256)
        body = json.dumps({"token_ids": tokens}).encode()
        url = urlsplit(agent.url)
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
        headers = {"Content-Type": "application/json"}

        def ask() -> float:
            t0 = time.perf_counter()
            conn.request("POST", "/v1/prefix", body, headers)
            answer = json.loads(conn.getresponse().read())
            elapsed = time.perf_counter() - t0
            if answer.get("tokens") != 4096:
                raise RuntimeError(f"prefix query answered {answer}, expected 4096 tokens")
            return elapsed

        try:
            for _ in range(100):
                ask()
            rtts = sorted(ask() for _ in range(max(200, args.lookups // 5)))
        finally:
            conn.close()
    report.add(Result("prefix_query_p50", rtts[len(rtts) // 2] * 1e6, "us", None))
    report.add(Result("prefix_query_p99", rtts[int(len(rtts) * 0.99)] * 1e6, "us", None))


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
    config.write_text(
        f"[store.ssd]\nwrite_queue_depth = {SSD_WRITE_QUEUE}\nworkers = {SSD_WORKERS}\n"
    )
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


SSD_ROUNDS = 4
"""Rounds of raw, agent, raw, agent, ... per chunk size (the disk drifts several-fold within
minutes here: interleaving puts slow minutes on both sides)."""


def _agent_write(client: AgentClient, keys: list[bytes], src: np.ndarray) -> float:
    """Store ``keys`` (write-through) and wait until the agent reports each on SSD; the
    seconds from the first reserve to the last chunk on disk."""
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
    while on_ssd - base < len(keys):
        _check(deadline, "SSD writes")
        time.sleep(0.002)
        on_ssd = _ssd_stats(client)["chunks"]
    seconds = time.perf_counter() - t0
    if _ssd_stats(client)["writes_refused"] != start["writes_refused"]:
        raise RuntimeError("the SSD tier refused writes; the write number is invalid")
    return seconds


def _agent_read(client: AgentClient, keys: list[bytes], per: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(keys), per):
        leases = client.read(keys[i : i + per])
        missing = sum(x is None for x in leases)
        client.release([x for x in leases if x is not None])
        del leases
        if missing:
            raise RuntimeError(f"{missing} chunks written to SSD were not served")
    return time.perf_counter() - t0


def _measure_ssd_sizes(
    agent: AgentProcess, ssd_dir: Path, args: argparse.Namespace, report: Report
) -> None:
    """Per chunk size, ``SSD_ROUNDS`` rounds of raw then agent, for writes and then (after a
    restart that empties the CPU tier, page cache dropped) for reads. GB/s of each side is
    its total bytes over its total seconds."""
    for size_mib in CHUNK_SIZES_MIB:
        size = size_mib * MiB
        per_round = max(2, args.ssd_mib * MiB // size // SSD_ROUNDS)
        src = _chunks(size, 1)[0]
        rounds = [_keys(f"d{size_mib}{r}", 0, per_round) for r in range(SSD_ROUNDS)]  # <= 16 bytes
        raw_w = direct_w = agent_w = raw_r = agent_r = 0.0
        with running(agent), agent.client(timeout=30.0) as client:
            # Map the arena before the clock (an engine maps it once, at start): it cost
            # ~0.4 s of the first round's writes before (2 GiB, MAP_POPULATE).
            client.map_arena()
            for keys in rounds:
                (raw,) = measure_raw(str(ssd_dir), [size], per_round, workers=SSD_WORKERS)
                raw_w += size * per_round / raw.write_gbps / 1e9
                (raw,) = measure_raw(
                    str(ssd_dir), [size], per_round, workers=SSD_WORKERS, direct=True
                )
                direct_w += size * per_round / raw.write_gbps / 1e9
                agent_w += _agent_write(client, keys, src)
        # Restart: an empty CPU tier; the SSD scan finds the chunks. Drop their cached pages.
        with running(agent), agent.client(timeout=30.0) as client:
            client.map_arena()  # connect and map the arena before the clock starts
            for path in ssd_dir.rglob("*.mkv"):
                drop_file_cache(str(path))
            per = max(1, args.batch_mib * MiB // size)
            for keys in rounds:
                (raw,) = measure_raw(str(ssd_dir), [size], per_round, workers=SSD_WORKERS)
                raw_r += size * per_round / raw.read_gbps / 1e9
                agent_r += _agent_read(client, keys, per)
        total = size * per_round * SSD_ROUNDS
        report.add(
            Result("ssd_write", _gbps(total, agent_w), "GB/s", size, "raw_pwrite",
                   _gbps(total, raw_w))
        )  # fmt: skip
        report.add(
            Result("ssd_write_vs_direct", _gbps(total, agent_w), "GB/s", size,
                   "raw_pwrite_direct", _gbps(total, direct_w))
        )  # fmt: skip
        report.add(
            Result("ssd_read", _gbps(total, agent_r), "GB/s", size, "raw_pread",
                   _gbps(total, raw_r))
        )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    report = Report("local")
    report.meta.update(
        cpus=os.cpu_count(),
        batch_bytes=args.batch_mib * MiB,
        batches=args.batches,
        cpu_tier_bytes=int(args.cpu_gb * (1 << 30)),
        loadavg_start=os.getloadavg()[0],
    )
    if args.ssd_dir and not os.path.isdir(args.ssd_dir):
        print(f"meshkv bench local: --ssd-dir {args.ssd_dir} is not a directory", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="mkv-bench-", dir="/tmp"))
    # On the disk the user named, in a fresh directory of its own: the files of an agent
    # that uses the same disk (or anything else there) are never read, counted or removed.
    scratch = Path(tempfile.mkdtemp(prefix="mkv-bench-ssd-", dir=args.ssd_dir or workdir))
    ssd_dir = scratch / "ssd"
    ssd_dir.mkdir()
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
                        measure_lookup_under_load(client, cpu_agent.socket_path, args, report)
                        measure_prefix_query(cpu_agent, args, report)
                    if args.only in (None, "cpu"):
                        measure_cpu(client, args, report)
            finally:
                cpu_agent.cleanup()
        if not args.skip_ssd and args.only in (None, "ssd"):
            report.meta["ssd_dir"] = str(ssd_dir)
            measure_ssd(workdir, ssd_dir, args, report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    report.meta["loadavg_end"] = os.getloadavg()[0]
    print(report.table())
    print(
        f"load average (1 min): {report.meta['loadavg_start']:.1f} at start, "
        f"{report.meta['loadavg_end']:.1f} at end; ratios are only meaningful on a quiet host"
    )
    report.write(args.json)
    return 0
