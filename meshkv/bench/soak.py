"""``meshkv bench soak``: mixed load and churn on a small mesh for N minutes, then a leak check.

Three agents (``--agents``) form a mesh on loopback, each with a small CPU tier and an SSD
tier, so eviction, demotion, promotion and peer pulls all run. ``--clients`` threads per
agent keep a mix going on the local channel:

* store a new chunk (16-512 KiB; its bytes are a function of its key, so any reader can
  check them), half of them in batches;
* read a chunk stored through *any* agent (lookup, then read with a wait: pulls from
  peers, promotions from SSD), check every byte, release;
* reserve and abort; reserve and never commit (the reservation expires, its slot is fenced);
  read and never release (the lease goes overdue); drop the connection with both open.

Agent 0 is the **steady** one; every ``--churn-s`` seconds another agent is killed
(SIGKILL and SIGTERM in turn) and started again on the same address and SSD directory.

After a warm-up (a quarter of the run, at least 20 s) the steady agent's numbers are taken
as the baseline; at the end (load stopped, every client closed) they must show no growth:

* anonymous resident memory (heap; the arena's shared pages are apart) within ``+5 %``;
* open file descriptors and event-loop tasks no more than the most seen in the first half
  after the warm-up (connections come and go with the churn; a leak keeps growing);
* 0 open leases, reservations and fenced slots on every running agent;
* 0 corrupt reads, 0 unexpected client errors, 0 tracebacks in the steady agent's log.

Beside the checks it reports ``rss_anon_slope``: the least-squares slope of the steady
agent's anonymous memory over the samples after the warm-up (every 5 s, under load), in
MiB per hour, so a small growth can be told apart from a steady climb; beside it the
slope over the second half alone (a heap still warming up at the baseline climbs early
and is level late), and the slopes of the heap's parts (glibc's bytes in use and freed
but kept, Python's live blocks: ``meshkv.heap``), which say what climbs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from meshkv.bench.report import Report, Result, text_table
from meshkv.bench.scratch import WORKDIR_HELP, run_in_scratch
from meshkv.client import AgentClient
from meshkv.errors import AgentUnavailable, MeshKVError, NoSpace
from meshkv.launch import AgentProcess, free_port, mesh_args, write_secret

logger = logging.getLogger(__name__)

FD_SLACK = 4
"""Descriptors the steady agent may hold above its baseline at the end (mesh connections
to peers that were restarted are re-dialled lazily)."""
TASK_SLACK = 4
RSS_GROWTH_LIMIT = 0.05
HEAP_PARTS = {
    "malloc_in_use_slope": "malloc_in_use_bytes",
    "malloc_free_slope": "malloc_free_bytes",
}
"""The trend of glibc's numbers beside the resident one (absent where the C library is
not glibc)."""


def slope_per_hour(samples: list[dict[str, Any]], name: str, since: float) -> float:
    """Least-squares slope of ``name`` over the samples taken at or after ``since`` seconds,
    per hour (0.0 with fewer than two): whether memory still climbs at the end of a run or
    has levelled off, which one growth ratio between two points cannot tell."""
    points = [(float(s["t"]), float(s[name])) for s in samples if s["t"] >= since and name in s]
    try:
        return statistics.linear_regression(*zip(*points, strict=True)).slope * 3600
    except (statistics.StatisticsError, TypeError):  # fewer than two points, or one time
        return 0.0


def payload(key: bytes, size: int) -> bytes:
    """The bytes of chunk ``key``: a function of the key, so any reader can check them."""
    seed = xxhash.xxh3_128_digest(key)
    return (seed * (size // len(seed) + 1))[:size]


@dataclass(slots=True)
class Tally:
    """Client-side counts (summed over threads under a lock)."""

    stores: int = 0
    reads: int = 0
    read_hits: int = 0
    bytes_checked: int = 0
    corrupt: int = 0
    unavailable: int = 0
    no_space: int = 0
    abandoned: int = 0
    errors: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.tally = Tally()
        self.keys: list[tuple[bytes, int]] = []
        self.agents: list[AgentProcess] = []
        self.samples: list[dict[str, Any]] = []
        self.churned = 0

    # --- the mesh ---------------------------------------------------------------------

    def start_mesh(self) -> None:
        secret = write_secret(self.workdir)
        ports = [free_port() for _ in range(self.args.agents)]
        seed = f"127.0.0.1:{ports[0]}"
        for i, port in enumerate(ports):
            ssd = self.workdir / f"ssd-{i}"
            ssd.mkdir(parents=True, exist_ok=True)
            config = self.workdir / f"agent-{i}.toml"
            config.write_text(
                "[store.cpu]\nsegment_bytes = 1048576\n"
                f"reserve_timeout_s = {self.args.expiry_s}\n"
                f"max_lease_s = {self.args.expiry_s}\n"
                f'[store.ssd]\ndirectory = "{ssd}"\ncapacity_bytes = {256 << 20}\n'
                "fsync = false\n"
            )
            args = mesh_args(secret, listen=f"127.0.0.1:{port}", join=None if i == 0 else [seed])
            agent = AgentProcess(
                name=f"soak-{i}", cpu_bytes=self.args.cpu_mib << 20, log_level="info",
                args=[*args, "--config", str(config)],
            )  # fmt: skip
            self.agents.append(agent.start())

    def status(self, agent: AgentProcess) -> dict[str, Any]:
        return dict(agent.get_json("/v1/status"))

    # --- load ------------------------------------------------------------------------

    def _note(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self.tally, name, getattr(self.tally, name) + n)

    def _error(self, text: str) -> None:
        with self.lock:
            if len(self.tally.errors) < 50:
                self.tally.errors.append(text)

    def client_loop(self, agent_index: int, seed: int) -> None:
        rng = random.Random(seed)
        agent = self.agents[agent_index]
        client: AgentClient | None = None
        while not self.stop.is_set():
            try:
                if client is None:
                    client = AgentClient(agent.socket_path, timeout=2.0)
                action = rng.random()
                if action < 0.35:
                    self._store(client, rng)
                elif action < 0.85:
                    self._read(client, rng)
                elif action < 0.93:
                    self._reserve_abort(client, rng)
                else:
                    self._abandon(client, rng)
                    client = None  # the connection was dropped with work open
                if client is not None and rng.random() < 0.02:
                    client.close()  # a clean reconnect now and then
                    client = None
            except AgentUnavailable:
                self._note(unavailable=1)
                if client is not None:
                    client.close()
                client = None
                self.stop.wait(0.2)
            except NoSpace:
                self._note(no_space=1)
            except MeshKVError as exc:
                if not agent.running:  # it was churned under us
                    self._note(unavailable=1)
                else:
                    self._error(f"{type(exc).__name__}: {exc}")
                if client is not None:
                    client.close()
                client = None
            except Exception as exc:  # counted and reported: the soak must show zero
                self._error(f"{type(exc).__name__}: {exc}")
                if client is not None:
                    client.close()
                client = None
        if client is not None:
            client.close()

    def _store(self, client: AgentClient, rng: random.Random) -> None:
        n = rng.choice((1, 1, 4))
        keys = [rng.randbytes(16) for _ in range(n)]
        sizes = [rng.randrange(16 << 10, 512 << 10) for _ in keys]
        reservations = client.reserve(keys, sizes)
        done = []
        for key, size, res in zip(keys, sizes, reservations, strict=True):
            if res is not None:
                res.view[:] = payload(key, size)
                done.append((key, size))
        if done:
            client.commit([k for k, _ in done], [16] * len(done))
            with self.lock:
                self.keys.extend(done)
                if len(self.keys) > 20_000:
                    del self.keys[:10_000]
            self._note(stores=len(done))

    def _read(self, client: AgentClient, rng: random.Random) -> None:
        with self.lock:
            if not self.keys:
                return
            picked = [self.keys[rng.randrange(len(self.keys))] for _ in range(rng.choice((1, 4)))]
        keys = [k for k, _ in picked]
        client.lookup(keys)
        leases = client.read(keys, wait=0.5)
        try:
            for (key, size), lease in zip(picked, leases, strict=True):
                if lease is None:
                    continue
                self._note(read_hits=1, bytes_checked=size)
                if bytes(lease.view) != payload(key, size):
                    self._note(corrupt=1)
                    self._error(f"corrupt read of {key.hex()}")
        finally:
            held = [x for x in leases if x is not None]
            if held:
                client.release(held)
        self._note(reads=len(keys))

    def _reserve_abort(self, client: AgentClient, rng: random.Random) -> None:
        key = rng.randbytes(16)
        (res,) = client.reserve([key], [64 << 10])
        if res is not None:
            res.view[:16] = key
            client.abort([key])

    def _abandon(self, client: AgentClient, rng: random.Random) -> None:
        """Leave a reservation and a lease open past their deadlines, then drop the
        connection without a goodbye."""
        client.reserve([rng.randbytes(16)], [64 << 10])
        with self.lock:
            key = self.keys[rng.randrange(len(self.keys))][0] if self.keys else None
        if key is not None:
            client.read([key])
        self.stop.wait(rng.uniform(0.5, 2.0) * self.args.expiry_s)
        client.close()
        self._note(abandoned=1)

    # --- churn and sampling ------------------------------------------------------------

    def churn_loop(self) -> None:
        victims = self.agents[1:]
        turn = 0
        while victims and not self.stop.wait(self.args.churn_s):
            agent = victims[turn % len(victims)]
            if turn % 2 == 0:
                agent.kill()
            else:
                agent.stop()
            self.stop.wait(2.0)
            try:
                agent.start()
            except Exception as exc:
                self._error(f"restart of {agent.name}: {exc}")
                return
            self.churned += 1
            turn += 1

    def sample(self) -> dict[str, Any]:
        doc = self.status(self.agents[0])
        store = doc["store"]
        row = {"t": round(time.monotonic() - self.started, 1), **doc["process"]}
        for name in ("leases_open", "reservations_open", "fenced_slots", "leases_overdue"):
            row[name] = store[name]
        # what the heap holds per key: a trend in these beside one in rssanon says which
        tiers = store.get("tiers", {})
        row["cpu_chunks"] = tiers.get("cpu", {}).get("chunks", 0)
        row["ssd_chunks"] = tiers.get("ssd", {}).get("chunks", 0)
        row["directory_keys"] = doc.get("mesh", {}).get("directory_keys", 0)
        self.samples.append(row)
        return row

    # --- the run ---------------------------------------------------------------------

    def run(self) -> Report:
        args = self.args
        self.start_mesh()
        self.started = time.monotonic()
        seconds = args.minutes * 60
        warmup = max(20.0, seconds / 4)
        threads = [
            threading.Thread(target=self.client_loop, args=(i, 1000 * i + c), daemon=True)
            for i in range(len(self.agents))
            for c in range(args.clients)
        ]
        threads.append(threading.Thread(target=self.churn_loop, daemon=True))
        for t in threads:
            t.start()
        baseline: dict[str, Any] | None = None
        while time.monotonic() - self.started < seconds:
            time.sleep(min(5.0, max(0.1, seconds - (time.monotonic() - self.started))))
            row = self.sample()
            if baseline is None and row["t"] >= warmup:
                baseline = row
                logger.info("soak baseline at %.0f s: %s", row["t"], row)
        self.stop.set()
        for t in threads:
            t.join(timeout=30)
        # Every client is gone; let the agents finish closing connections.
        time.sleep(max(3.0, args.expiry_s))
        final = self.sample()
        baseline = dict(baseline or self.samples[0])
        # Connections (one task and one descriptor each) come and go with the churn: the
        # baseline for them is the most seen in the first half after the warm-up, and a
        # leak shows as more than that at the end, when every client is gone.
        early = [
            s for s in self.samples if baseline["t"] <= s["t"] <= (baseline["t"] + seconds) / 2
        ]
        for name in ("tasks", "open_fds"):
            baseline[name] = max([baseline[name], *(s[name] for s in early)])
        return self.report(baseline, final)

    def report(self, baseline: dict[str, Any], final: dict[str, Any]) -> Report:
        t = self.tally
        rss0, rss1 = baseline.get("rssanon_bytes", 0), final.get("rssanon_bytes", 0)
        leaks = {"leases_open": 0, "reservations_open": 0, "fenced_slots": 0}
        for agent in self.agents:
            if agent.running:
                store = self.status(agent)["store"]
                for name in leaks:
                    leaks[name] += int(store[name])
        checks: list[tuple[str, float, float, str, str]] = [
            ("rss_anon_growth", round((rss1 - rss0) / rss0, 4) if rss0 else 0.0,
             RSS_GROWTH_LIMIT, "ratio",
             f"steady agent: {rss0 / 2**20:.1f} MiB at {baseline['t']} s, "
             f"{rss1 / 2**20:.1f} MiB at {final['t']} s"),
            ("fd_growth", final["open_fds"] - baseline["open_fds"], FD_SLACK, "fds",
             f"{baseline['open_fds']} -> {final['open_fds']}"),
            ("task_growth", final["tasks"] - baseline["tasks"], TASK_SLACK, "tasks",
             f"{baseline['tasks']} -> {final['tasks']}"),
            *((f"leaked_{name}", value, 0, "count", "all running agents")
              for name, value in leaks.items()),
            ("corrupt_reads", t.corrupt, 0, "count", f"{t.bytes_checked >> 20} MiB checked"),
            ("client_errors", len(t.errors), 0, "count", "; ".join(t.errors[:3])),
            ("agent_tracebacks", self.agents[0].log().count("Traceback"), 0, "count",
             "steady agent's log"),
        ]  # fmt: skip
        r = Report("soak")
        for name, value, _, unit, _ in checks:
            r.add(Result(name, value, unit))
        # the trend under load (the final sample is taken after the load stopped)
        loaded = [s for s in self.samples if s is not final]
        per_hour = slope_per_hour(loaded, "rssanon_bytes", baseline["t"]) / 2**20
        r.add(Result("rss_anon_slope", round(per_hour, 2), "MiB/h"))
        # and over the run's second half only: a heap that warms up for longer than the
        # baseline's quarter climbs in the first half and is level in the second
        half = (baseline["t"] + final["t"]) / 2
        late = slope_per_hour(loaded, "rssanon_bytes", half) / 2**20
        r.add(Result("rss_anon_slope_second_half", round(late, 2), "MiB/h"))
        # the parts of that heap (meshkv.heap): a native leak climbs in use, fragmentation
        # or idle per-thread arenas climb free, Python objects climb blocks
        for name, field_ in HEAP_PARTS.items():
            if field_ in baseline:
                part = slope_per_hour(loaded, field_, baseline["t"]) / 2**20
                r.add(Result(name, round(part, 2), "MiB/h"))
        blocks = slope_per_hour(loaded, "python_blocks", baseline["t"])
        r.add(Result("python_blocks_slope", round(blocks), "blocks/h"))
        r.meta.update(
            checks=[{"name": n, "value": v, "limit": lim, "ok": v <= lim, "note": note}
                    for n, v, lim, _, note in checks],
            minutes=self.args.minutes, agents=self.args.agents, clients=self.args.clients,
            churned=self.churned, tally=asdict(t), baseline=baseline, final=final,
            samples=self.samples,
        )  # fmt: skip
        return r

    def close(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.stop()
            agent.cleanup()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=30.0, help="length of the run")
    p.add_argument("--agents", type=int, default=3, help="mesh members (agent 0 is steady)")
    p.add_argument("--clients", type=int, default=2, help="client threads per agent")
    p.add_argument("--cpu-mib", type=int, default=64, help="CPU tier of each agent")
    p.add_argument("--churn-s", type=float, default=20.0, help="restart an agent this often")
    p.add_argument(
        "--expiry-s", type=float, default=2.0,
        help="reservation timeout and lease cap of the agents (abandoned work expires)",
    )  # fmt: skip
    p.add_argument("--workdir", help=WORKDIR_HELP)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for flag in ("minutes", "agents", "clients", "cpu_mib", "churn_s", "expiry_s"):
        if not getattr(args, flag) > 0:
            print(f"meshkv bench soak: --{flag.replace('_', '-')} must be positive",
                  file=sys.stderr)  # fmt: skip
            return 2
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, workdir)
    try:
        report = soak.run()
    finally:
        soak.close()
    rows = [["check", "value", "limit", "ok", "note"]] + [
        [c["name"], str(c["value"]), str(c["limit"]), "yes" if c["ok"] else "NO", c["note"]]
        for c in report.meta["checks"]
    ]
    print(text_table(rows))
    trend = next(x for x in report.results if x.name == "rss_anon_slope")
    print(f"steady agent's anonymous memory under load after the warm-up: "
          f"{trend.value:+.2f} MiB per hour (least squares over the samples)")  # fmt: skip
    parts = {x.name: x.value for x in report.results}
    print(f"  in the second half of the loaded run: {parts['rss_anon_slope_second_half']:+.2f} "
          "MiB per hour")  # fmt: skip
    if "malloc_in_use_slope" in parts:
        print(f"  of which glibc's heap in use {parts['malloc_in_use_slope']:+.2f} MiB/h, "
              f"freed but kept {parts['malloc_free_slope']:+.2f} MiB/h; "
              f"Python's live blocks {parts['python_blocks_slope']:+,.0f} per hour")  # fmt: skip
    tally = report.meta["tally"]
    print(
        f"{tally['stores']} stores, {tally['reads']} reads ({tally['read_hits']} hits, "
        f"{tally['bytes_checked'] >> 20} MiB checked), {tally['abandoned']} abandoned "
        f"connections, {soak.churned} agent restarts, {tally['unavailable']} calls to a "
        "churned agent"
    )
    report.write(args.json)
    return 0 if all(c["ok"] for c in report.meta["checks"]) else 1


def run(args: argparse.Namespace) -> int:
    """The run in ``--workdir``, or in a temporary directory removed when it passes."""
    return run_in_scratch(_run, args, prefix="mkv-soak-", command="meshkv bench soak")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshkv bench soak")
    p.add_argument("--json", metavar="FILE")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
