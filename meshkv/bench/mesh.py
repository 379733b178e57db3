"""``meshkv bench mesh``: peer pulls, lookups through the home, and the simulator's wall time.

Every number is compared with a baseline measured in the same run (this machine is noisy):

* ``pull_tcp`` — GB/s of peer pulls between two real agents over TCP: an engine on agent B
  looks up ``--chunks`` 16 MiB chunks that agent A holds, the mesh pulls them into B's
  arena, and the engine reads them (lookup to last lease). Baseline: blocking
  ``sendall``/``recv_into`` of the same bytes on loopback (``transport_baselines``), timed
  right before every pull round so both sides see the same load, over one server process
  and connection kept for the whole run as the agents are (``RawTcpRounds``).
* ``pull_ucx`` — the same over ``--transport ucx``; baseline: bare ucxx tag messages.
* ``pull_vs_redis`` — ``pull_tcp`` against Redis (Debian ``redis-server``, started here on
  loopback with a temp dir): redis-py ``GET`` of the same number of 16 MiB blobs, timed
  right before every pull round like the raw baseline. ``pull_ucx_vs_redis``: ``pull_ucx``
  against the same (on one host UCX moves the bytes through shared memory, Redis through
  loopback TCP: what a user of each gets here, not the same wire).
* ``remote_read`` — GB/s of reads from the shared Redis tier (``--remote``): an engine on
  agent C (no mesh, the same Redis) looks up and reads the chunks agent A stored and wrote
  behind; C fetches each value, verifies it and stores it in its arena (lookup to last
  lease). Baseline: ``peer_pull``, agent B pulling the very same chunks from A in the same
  round, right before.
* ``lookup_home_p50`` / ``lookup_home_p99`` — µs to find the holders of a 64-chunk prompt
  through their homes (one request per home, in parallel) from a third mesh member
  running in this process, over loopback TCP. Target: p99 <= 1 ms.

The simulator's wall time is measured by ``python -m benchmarks.sim_wall`` in the source
tree (``make bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from meshkv.bench.args import positive_int
from meshkv.bench.local import running
from meshkv.bench.report import Report, Result
from meshkv.chunk import ChunkKey
from meshkv.client import DEFAULT_NAMESPACE, AgentClient
from meshkv.launch import AgentProcess, RedisProcess, listen_args

CHUNK_BYTES = 16 << 20
SECRET = os.urandom(24).hex()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chunks", type=positive_int, default=8, help="16 MiB chunks per pull round"
    )
    parser.add_argument("--rounds", type=positive_int, default=6, help="pull rounds per transport")
    parser.add_argument(
        "--lookups", type=positive_int, default=2000, help="64-chunk lookups to time"
    )
    parser.add_argument("--skip-ucx", action="store_true", help="no UCX measurement")
    parser.add_argument("--skip-redis", action="store_true", help="no Redis comparison")


def _agent(
    workdir: Path,
    name: str,
    transport: str,
    join: str | None,
    gib: int,
    more: list[str] | None = None,
) -> AgentProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    secret = workdir / "secret"
    if not secret.exists():
        secret.write_text(SECRET)
        secret.chmod(0o600)
    extra = [
        *listen_args("127.0.0.1:0", transport), "--mesh-secret-file", str(secret),
        "--transport", transport, "--mesh-preset", "local",
    ]  # fmt: skip
    if join:
        extra += ["--join", join]
    extra += more or []
    return AgentProcess(name=f"bench-{name}", cpu_bytes=gib << 30, args=extra, log_level="warning")


def _http(agent: AgentProcess, path: str) -> Any:
    return agent.get_json(path)


def _alive(agent: AgentProcess) -> int:
    return int(_http(agent, "/v1/status")["mesh"]["alive_members"])


def _wait(what: str, predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, KeyError, ValueError):
            if predicate():
                return
        time.sleep(0.05)
    raise TimeoutError(f"bench mesh: timed out waiting for {what}")


@contextlib.contextmanager
def _pair(
    workdir: Path, transport: str, gib: int, tag: str = "", more: list[str] | None = None
) -> Iterator[tuple[AgentProcess, AgentProcess]]:
    workdir = workdir / (tag or transport)
    a = _agent(workdir, "a", transport, None, gib, more)
    try:
        with running(a):
            seed = _http(a, "/v1/status")["mesh"]["address"]
            b = _agent(workdir, "b", transport, seed, gib, more)
            try:
                with running(b):
                    _wait(
                        "two members", lambda: _http(b, "/v1/status")["mesh"]["alive_members"] == 2
                    )
                    _wait(
                        "two members", lambda: _http(a, "/v1/status")["mesh"]["alive_members"] == 2
                    )
                    yield a, b
            finally:
                b.cleanup()
    finally:
        a.cleanup()


Baseline = Callable[[int, int], float]
"""GB/s of moving ``count`` blobs of ``nbytes`` (called as ``baseline(nbytes, count)``)."""


def measure_pulls(
    workdir: Path,
    transport: str,
    chunks: int,
    rounds: int,
    baselines: dict[str, Baseline],
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[float, dict[str, float]]:
    """(pull GB/s, GB/s per baseline) over ``rounds`` rounds of ``chunks`` chunks of
    ``chunk_bytes`` each.

    Every round times each baseline moving the same bytes right before the pull (lookup,
    pull into B's arena, read), so all see the same machine load (ABAB); each side's GB/s
    is its total bytes over its total time.
    """
    gib = max(1, (chunks * (rounds + 1) * chunk_bytes >> 30) + 1)
    data = os.urandom(chunk_bytes)
    round_bytes = chunks * chunk_bytes
    pull_s = 0.0
    base_s = dict.fromkeys(baselines, 0.0)
    with (
        _pair(workdir, transport, gib) as (a, b),
        a.client(timeout=30) as ca,
        b.client(timeout=30) as cb,
    ):
        for round_no in range(rounds + 1):  # round 0 warms connections up; not counted
            keys = [os.urandom(16) for _ in range(chunks)]
            for key in keys:
                ca.put(key, data)
            _wait(
                "announcements",
                lambda ks=keys: all(
                    _http(b, f"/v1/owners/{k.hex()}")["holders"] == ["bench-a"] for k in ks
                ),
            )
            for name, baseline in baselines.items():
                gbps = baseline(chunk_bytes, chunks)
                if round_no:
                    base_s[name] += round_bytes / (gbps * 1e9)
            elapsed = _timed_read(cb, keys, data, "peer")
            if round_no:
                pull_s += elapsed
    total = rounds * round_bytes
    return total / pull_s / 1e9, {name: total / t / 1e9 for name, t in base_s.items()}


# --- Redis -------------------------------------------------------------------------------


class RedisGets:
    """The Redis baseline: redis-py ``GET`` of 16 MiB blobs from a loopback
    ``redis-server``, one blob at a time, as a ``Baseline`` the pull rounds interleave."""

    def __init__(self, server: RedisProcess, chunks: int) -> None:
        self._client = server.client()
        data = os.urandom(CHUNK_BYTES)
        self._names = [f"blob-{i}" for i in range(chunks)]
        for name in self._names:
            self._client.set(name, data)
        for name in self._names:  # warm-up
            self._client.get(name)

    def __call__(self, nbytes: int, count: int) -> float:
        if nbytes != CHUNK_BYTES or count != len(self._names):
            raise ValueError(f"stored {len(self._names)} blobs of {CHUNK_BYTES} bytes")
        start = time.perf_counter()
        for name in self._names:
            if len(self._client.get(name) or b"") != CHUNK_BYTES:
                raise RuntimeError("redis returned a short blob")
        return count * nbytes / (time.perf_counter() - start) / 1e9

    def close(self) -> None:
        self._client.close()


def measure_remote(workdir: Path, chunks: int, rounds: int) -> tuple[float, float]:
    """(remote-tier read GB/s, peer pull GB/s) of the same chunks, round by round: A stores
    them (and writes them behind to Redis); B pulls them from A; C reads them from Redis."""
    gib = max(1, (chunks * (rounds + 1) * CHUNK_BYTES >> 30) + 1)
    data = os.urandom(CHUNK_BYTES)
    total = {"peer": 0.0, "remote": 0.0}
    with RedisProcess() as redis:
        remote = ["--remote", redis.url, "--remote-gb", str(2 * gib + 1)]
        c = AgentProcess(name="bench-c", cpu_bytes=gib << 30, args=remote, log_level="warning")
        with (
            _pair(workdir, "tcp", gib, "remote", remote) as (a, b),
            running(c),
            a.client(timeout=30) as ca,
            b.client(timeout=60) as cb,
            c.client(timeout=60) as cc,
        ):
            for round_no in range(rounds + 1):  # round 0 warms connections up; not counted
                keys = [os.urandom(16) for _ in range(chunks)]
                written = a.metric("meshkv_remote_writes_total") + chunks
                for key in keys:
                    ca.put(key, data)
                _wait(
                    "announcements and copies",
                    lambda ks=keys, n=written: (
                        a.metric("meshkv_remote_writes_total") >= n
                        and all(
                            _http(b, f"/v1/owners/{k.hex()}")["holders"] == ["bench-a"] for k in ks
                        )
                    ),
                    timeout=120.0,
                )
                for reader, way in ((cb, "peer"), (cc, "remote")):
                    elapsed = _timed_read(reader, keys, data, way)
                    if round_no:
                        total[way] += elapsed
    moved = rounds * chunks * CHUNK_BYTES
    return moved / total["remote"] / 1e9, moved / total["peer"] / 1e9


def _timed_read(client: AgentClient, keys: list[bytes], data: bytes, way: str) -> float:
    """Seconds from the lookup of ``keys`` to the last lease (checked: every chunk found
    through ``way``, its bytes right)."""
    start = time.perf_counter()
    reply = client.lookup(keys)
    leases = client.read(keys, wait=60.0)
    elapsed = time.perf_counter() - start
    got = [x for x in leases if x is not None]
    try:
        if reply.tiers != [way] * len(keys) or len(got) != len(keys):
            raise RuntimeError(f"{way}: found {reply.tiers}, read {len(got)} of {len(keys)}")
        if any(bytes(x.view[-4096:]) != data[-4096:] for x in got):
            raise RuntimeError(f"{way}: bytes differ")
    finally:
        client.release(got)
        del got, leases  # views into the client's arena mapping
    return elapsed


# --- lookups through the home --------------------------------------------------------------


def measure_lookups(workdir: Path, lookups: int) -> tuple[float, float]:
    """p50 / p99 µs of locating a 64-chunk prompt's holders through their homes."""
    with _pair(workdir, "tcp", 1, "lookup") as (a, _b), a.client() as ca:
        keys = [os.urandom(16) for _ in range(64)]
        for key in keys:
            ca.put(key, b"k" * 4096)
        seed = _http(a, "/v1/status")["mesh"]["address"]
        coro = _probe_lookups(workdir, seed, keys, lookups)
        try:
            import uvloop  # the agent's loop; time the probe on the same kind
        except ImportError:
            return asyncio.run(coro)
        result: tuple[float, float] = uvloop.run(coro)
        return result


async def _probe_lookups(
    workdir: Path, seed: str, keys: list[bytes], lookups: int
) -> tuple[float, float]:
    from meshkv.mesh.node import MeshNode
    from meshkv.mesh.options import MeshNodeConfig
    from meshkv.puller import Puller
    from meshkv.store import Store, StoreConfig
    from meshkv.tiers.cpu import CpuTierConfig

    store = Store(StoreConfig(cpu=CpuTierConfig(capacity_bytes=64 << 20, prefault=False)))
    await store.start()
    config = MeshNodeConfig.from_preset(
        "local", listen="127.0.0.1:0", join=(seed,), secret=SECRET.encode()
    )
    node = MeshNode("bench-probe", config, store, Puller(store))
    await node.start()
    loop = asyncio.get_running_loop()
    ns = DEFAULT_NAMESPACE.digest()
    ckeys = [ChunkKey(k) for k in keys]
    try:
        deadline = loop.time() + 30
        while loop.time() < deadline:
            found = await node.fetcher.locate(ns, ckeys, loop.time() + 1)
            if len(node.ring) == 3 and len(found) == len(keys):
                break
            await asyncio.sleep(0.1)
        else:
            raise TimeoutError("the probe never saw every holder")
        samples: list[float] = []
        for _ in range(lookups):
            start = time.perf_counter()
            found = await node.fetcher.locate(ns, ckeys, loop.time() + 1)
            samples.append(time.perf_counter() - start)
            if len(found) != len(keys):
                raise RuntimeError(f"a lookup found {len(found)} of {len(keys)} chunks")
        samples.sort()
        return 1e6 * samples[len(samples) // 2], 1e6 * samples[int(len(samples) * 0.99)]
    finally:
        await node.close(loop.time() + 2)
        await store.close(loop.time() + 2)


# --- driver --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from meshkv.bench import transport_baselines as tb

    report = Report("mesh")
    report.meta.update(chunk_bytes=CHUNK_BYTES, chunks=args.chunks, rounds=args.rounds)
    with tempfile.TemporaryDirectory(prefix="meshkv-bench-mesh-") as tmp:
        workdir = Path(tmp)
        redis = not args.skip_redis
        if redis and shutil.which("redis-server") is None:
            # a fresh machine: say so and go on with the rest (make bench installs it)
            print(
                "pull_vs_redis skipped: redis-server is not installed "
                "(apt-get install -y redis-server, or make bench, which installs it)",
                flush=True,
            )
            redis = False
        with contextlib.ExitStack() as stack:
            raw_tcp = stack.enter_context(contextlib.closing(tb.RawTcpRounds()))
            # (transport, raw baseline, its result name, the pull's name against Redis)
            arms: list[tuple[str, Baseline, str, str]] = [
                ("tcp", raw_tcp, "raw_tcp_blocking", "pull_vs_redis")
            ]
            if not args.skip_ucx:
                arms.append(("ucx", tb.raw_ucx_baseline, "raw_ucxx", "pull_ucx_vs_redis"))
            gets = None
            if redis:
                gets = RedisGets(stack.enter_context(RedisProcess()), args.chunks)
                stack.callback(gets.close)
            for transport, raw, raw_name, vs_redis in arms:
                bases: dict[str, Baseline] = {"raw": raw}
                if gets is not None:
                    bases["redis"] = gets
                pull, base = measure_pulls(workdir, transport, args.chunks, args.rounds, bases)
                name = f"pull_{transport}"
                report.add(Result(name, pull, "GB/s", CHUNK_BYTES, raw_name, base["raw"]))
                if gets is not None:
                    report.add(
                        Result(vs_redis, pull, "GB/s", CHUNK_BYTES, "redis_get", base["redis"])
                    )
                print(report.table(), flush=True)
        if redis:
            remote_gbps, peer_gbps = measure_remote(workdir, args.chunks, args.rounds)
            report.add(
                Result("remote_read", remote_gbps, "GB/s", CHUNK_BYTES, "peer_pull", peer_gbps)
            )
        p50, p99 = measure_lookups(workdir, args.lookups)
        report.add(Result("lookup_home_p50", p50, "us", None, "target_p99", 1000.0))
        report.add(Result("lookup_home_p99", p99, "us", None, "target_p99", 1000.0))
    print(report.table())
    report.write(args.json)
    return 0
