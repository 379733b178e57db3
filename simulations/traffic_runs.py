"""The traffic scenarios: scale, workloads x routers, faults, link bandwidth.

``python -m simulations.traffic_runs [--only NAME ...] [--seed S] [--out DIR]`` runs them,
writes ``DIR/results/traffic_<name>.json`` and ``DIR/traffic_<name>.png`` (``make sim``:
``DIR`` = ``docs/simulations``). Every run is deterministic from the seed (the wall time is
the only field that changes between runs).

* ``scale`` — chat, round-robin routing (a session's next round lands on another node),
  16 → 1,000 nodes, one simulated hour each; ``traffic_chat_1000.json`` holds the 1,000-node
  run with the fields the issue names.
* ``workloads`` — chat, rag, agent and mix under random, round-robin and sticky routing, 64
  nodes, 30 simulated minutes.
* ``faults`` — 128 nodes, chat, round robin, one simulated hour with the agent's default
  60 s re-announce, one fault each: churn (10 % of the nodes per hour crash and come back
  empty two minutes later), a rack (10 %) failing at once, a partition in halves healed after
  5 minutes, the central service down for 5 minutes; hit rate per minute.
* ``bandwidth`` — 64 nodes, chat, round robin, links of 1 → 400 Gb/s: where pulling stops
  paying and the mesh falls back to computing.
* ``eviction`` — 64 nodes, chat, round robin, the tiers' LRU against S3-FIFO at three
  capacities.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import random
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

from meshkv.mesh.ring import Ring
from simulations.traffic import Cluster, ClusterConfig, CostModel
from simulations.workloads import Workload, WorkloadConfig

DESIGNS = ("mesh", "no_sharing", "central", "oracle_lru")
Event = tuple[float, Callable[[Cluster], None]]


class Router:
    """Which node serves a request: ``random``, ``round_robin`` or ``sticky`` (the session's
    node on a ring of the alive nodes, so a crash moves only that node's sessions)."""

    def __init__(self, kind: str, seed: int) -> None:
        if kind not in ("random", "round_robin", "sticky"):
            raise ValueError(f"router must be random, round_robin or sticky, not {kind!r}")
        self.kind = kind
        self._rng = random.Random(f"router/{seed}")
        self._i = 0
        self._alive: list[str] = []
        self._ring: Ring | None = None

    def set_alive(self, alive: list[str]) -> None:
        if alive != self._alive:
            self._alive = alive
            self._ring = None

    def pick(self, session: int) -> str:
        if self.kind == "random":
            return self._alive[self._rng.randrange(len(self._alive))]
        if self.kind == "round_robin":
            self._i += 1
            return self._alive[self._i % len(self._alive)]
        if self._ring is None:
            self._ring = Ring(self._alive)
        return self._ring.owner(session.to_bytes(16, "little"))


def simulate(
    nodes: int,
    workload: WorkloadConfig,
    router: str = "round_robin",
    duration_s: float = 3600.0,
    cluster: ClusterConfig | None = None,
    cost: CostModel | None = None,
    seed: int = 1,
    events: list[Event] | None = None,
) -> dict[str, Any]:
    """Serve one request stream by every design; return the results of each."""
    t0 = time.perf_counter()
    cl = Cluster(nodes, cluster or ClusterConfig(), cost or CostModel(), seed)
    r = Router(router, seed)
    pending = sorted(events or [], key=lambda e: e[0])
    alive = [n for n in cl.names if cl.mesh[n].alive]
    r.set_alive(alive)
    for req in Workload(workload, nodes, seed).requests(duration_s):
        while pending and pending[0][0] <= req.time:
            at, fn = pending.pop(0)
            cl.advance(at)
            fn(cl)
            r.set_alive([n for n in cl.names if cl.mesh[n].alive])
        cl.serve(req, r.pick(req.session))
    cl.advance(duration_s)
    out = {
        "nodes": nodes,
        "workload": workload.kind,
        "router": router,
        "simulated_s": duration_s,
        "designs": cl.results(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    return out


# -- faults ------------------------------------------------------------------------------


def _crash(names: list[str], detect_s: float, back_after_s: float | None) -> list[Event]:
    """Crash ``names`` now; views change after ``detect_s``; back empty after ``back_after_s``."""
    out: list[Event] = []

    def down(cl: Cluster) -> None:
        cl.crash(names)

    out.append((0.0, down))
    out.append((detect_s, lambda cl: cl.update_views()))
    if back_after_s is not None:

        def up(cl: Cluster) -> None:
            for n in names:
                cl.restart(n)

        out.append((back_after_s, up))
        out.append((back_after_s + 2.0, lambda cl: cl.update_views()))
    return out


def _at(t: float, evs: list[Event]) -> list[Event]:
    return [(t + dt, fn) for dt, fn in evs]


def fault_events(
    kind: str, nodes: int, duration_s: float, seed: int, detect_s: float
) -> list[Event]:
    names = [f"n{i:04d}" for i in range(nodes)]
    rng = random.Random(f"faults/{seed}/{kind}")
    tenth = max(1, nodes // 10)
    if kind == "churn":
        evs: list[Event] = []
        victims = rng.sample(names, tenth)
        for v in victims:
            evs += _at(rng.uniform(60.0, duration_s - 300.0), _crash([v], detect_s, 120.0))
        return evs
    if kind == "rack":
        return _at(duration_s / 3, _crash(rng.sample(names, tenth), detect_s, 600.0))
    if kind == "partition":
        t = duration_s / 3

        def cut(cl: Cluster) -> None:
            cl.partition(2)

        def heal(cl: Cluster) -> None:
            cl.heal()

        return [
            (t, cut),
            (t + detect_s, lambda cl: cl.update_views()),
            (t + 300.0, heal),
            (t + 302.0, lambda cl: cl.update_views()),
        ]
    if kind == "central_down":
        t = duration_s / 3

        def down(cl: Cluster) -> None:
            cl.central_up = False

        def up(cl: Cluster) -> None:
            cl.central_up = True

        return [(t, down), (t + 300.0, up)]
    raise ValueError(f"unknown fault {kind!r}")


# -- scenarios ---------------------------------------------------------------------------

CHAT = WorkloadConfig(kind="chat")
BASE = ClusterConfig()


def scenario_scale(seed: int) -> dict[str, Any]:
    runs = [simulate(n, CHAT, "round_robin", 3600.0, BASE, seed=seed) for n in (16, 64, 256, 1000)]
    return {"runs": runs}


def scenario_workloads(seed: int) -> dict[str, Any]:
    runs = []
    for kind in ("chat", "rag", "agent", "mix"):
        for router in ("random", "round_robin", "sticky"):
            cfg = replace(BASE, belady=False)
            runs.append(simulate(64, WorkloadConfig(kind=kind), router, 1800.0, cfg, seed=seed))
    return {"runs": runs}


def scenario_faults(seed: int) -> dict[str, Any]:
    cfg = replace(BASE, reannounce_s=60.0, belady=False)
    runs = {}
    for kind in ("churn", "rack", "partition", "central_down"):
        evs = fault_events(kind, 128, 3600.0, seed, cfg.detect_s)
        runs[kind] = simulate(128, CHAT, "round_robin", 3600.0, cfg, seed=seed, events=evs)
    return {"runs": runs, "fault_at_s": 1200.0}


def scenario_bandwidth(seed: int) -> dict[str, Any]:
    runs = []
    cfg = replace(BASE, belady=False)
    for gbps in (1, 10, 25, 100, 400):
        cost = CostModel(link_bytes_per_s=gbps * 1e9 / 8)
        res = simulate(64, CHAT, "round_robin", 1800.0, cfg, cost, seed=seed)
        res["link_gbps"] = gbps
        runs.append(res)
    return {"runs": runs}


def scenario_eviction(seed: int) -> dict[str, Any]:
    runs = []
    for cpu, ssd in ((32, 96), (64, 192), (128, 384)):
        for policy in ("lru", "s3fifo"):
            cfg = replace(BASE, cpu_chunks=cpu, ssd_chunks=ssd, policy=policy, belady=False)
            res = simulate(64, CHAT, "round_robin", 3600.0, cfg, seed=seed)
            res["policy"], res["slots_per_node"] = policy, cpu + ssd
            runs.append(res)
    return {"runs": runs}


SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    "scale": scenario_scale,
    "workloads": scenario_workloads,
    "faults": scenario_faults,
    "bandwidth": scenario_bandwidth,
    "eviction": scenario_eviction,
}


# -- plots -------------------------------------------------------------------------------


def _plot(name: str, result: dict[str, Any], out: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        return
    importlib.import_module("matplotlib").use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    runs = result["runs"]
    if name == "scale":
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        ns = [r["nodes"] for r in runs]
        # mesh last and dashed: it lies almost on the central directory's line
        for d, style in zip(
            ("oracle_belady", "oracle_lru", "central", "no_sharing", "mesh"),
            ("s:", "o-", "o-", "o-", "x--"),
            strict=True,
        ):
            axes[0].plot(ns, [r["designs"][d]["token_hit_rate"] for r in runs], style, label=d)
        axes[0].set(
            xscale="log", xlabel="nodes", ylabel="token hit rate", title="chat, round robin"
        )
        for d in ("mesh", "central"):
            axes[1].plot(
                ns, [r["designs"][d]["bytes_per_saved_token"] / 1024 for r in runs], "o-", label=d
            )
        axes[1].set(
            xscale="log",
            xlabel="nodes",
            ylabel="KiB moved per saved token",
            title="bytes per saved token",
        )
        axes[2].plot(
            ns,
            [r["designs"]["mesh"]["hottest_directory_load"] for r in runs],
            "o-",
            label="mesh: busiest home",
        )
        axes[2].plot(
            ns,
            [r["designs"]["central"]["central_over_mean_node_directory"] for r in runs],
            "o-",
            label="central service",
        )
        axes[2].set(
            xscale="log",
            yscale="log",
            xlabel="nodes",
            ylabel="directory messages / mean node's",
            title="hottest directory load",
        )
        for ax in axes:
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    elif name == "workloads":
        fig, axes = plt.subplots(1, 4, figsize=(15, 4), sharey=True)
        for ax, kind in zip(axes, ("chat", "rag", "agent", "mix"), strict=True):
            sub = [r for r in runs if r["workload"] == kind]
            x = range(len(sub))
            w = 0.2
            for j, d in enumerate(DESIGNS):
                ax.bar(
                    [i + (j - 1.5) * w for i in x],
                    [r["designs"][d]["token_hit_rate"] for r in sub],
                    w,
                    label=d,
                )
            ax.set_xticks(list(x), [r["router"] for r in sub])
            ax.set(title=kind, ylabel="token hit rate" if kind == "chat" else None)
            ax.grid(alpha=0.3, axis="y")
        axes[0].legend(fontsize=7)
    elif name == "faults":
        fig, axes = plt.subplots(1, 4, figsize=(15, 4), sharey=True)
        for ax, (kind, r) in zip(axes, runs.items(), strict=True):
            for d in ("mesh", "central", "no_sharing"):
                tl = r["designs"][d]["timeline"]
                ax.plot([int(k) for k in tl], list(tl.values()), label=d)
            ax.axvline(result["fault_at_s"] / 60, color="grey", ls=":")
            ax.set(
                title=kind, xlabel="minute", ylabel="token hit rate" if kind == "churn" else None
            )
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
    elif name == "eviction":
        fig, ax = plt.subplots(1, 1, figsize=(6, 4))
        for policy, style in (("lru", "o-"), ("s3fifo", "s--")):
            sub = [r for r in runs if r["policy"] == policy]
            slots = [r["slots_per_node"] for r in sub]
            for d in ("mesh", "no_sharing"):
                rates = [r["designs"][d]["token_hit_rate"] for r in sub]
                ax.plot(slots, rates, style, label=f"{d}, {policy}")
        ax.set(xlabel="slots per node (CPU + SSD)", ylabel="token hit rate", title="eviction")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        g = [r["link_gbps"] for r in runs]
        for d in ("mesh", "no_sharing", "oracle_lru"):
            axes[0].plot(g, [r["designs"][d]["token_hit_rate"] for r in runs], "o-", label=d)
            axes[1].plot(g, [r["designs"][d]["ttft_s_p50"] * 1000 for r in runs], "o-", label=d)
        axes[0].set(
            xscale="log", xlabel="link Gb/s", ylabel="token hit rate", title="pull or compute"
        )
        axes[1].set(xscale="log", xlabel="link Gb/s", ylabel="modelled TTFT p50 (ms)", title="TTFT")
        for ax in axes:
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"traffic_{name}.png", dpi=90)
    plt.close(fig)


def _run_one(name: str, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = SCENARIOS[name](seed)
    result["seed"] = seed
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def replot(out: Path) -> None:
    """Draw the PNGs again from the JSON already in ``out/results`` (no simulation)."""
    for name in SCENARIOS:
        path = out / "results" / f"traffic_{name}.json"
        if path.exists():
            _plot(name, json.loads(path.read_text()), out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.traffic_runs", description=__doc__)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="docs/simulations")
    p.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    p.add_argument("--jobs", type=int, default=2, help="scenarios run in parallel processes")
    p.add_argument("--replot", action="store_true", help="only redraw the PNGs from the JSON")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        replot(out)
        return 0
    (out / "results").mkdir(parents=True, exist_ok=True)
    names = args.only or list(SCENARIOS)
    if args.jobs > 1 and len(names) > 1:
        # scenarios are independent and deterministic: processes change only the wall time
        with ProcessPoolExecutor(min(args.jobs, len(names))) as pool:
            futures = {pool.submit(_run_one, name, args.seed): name for name in names}
            for future in as_completed(futures):
                _finish(futures[future], future.result(), out, args.seed)
    else:
        for name in names:
            _finish(name, _run_one(name, args.seed), out, args.seed)
    return 0


def _finish(name: str, result: dict[str, Any], out: Path, seed: int) -> None:
    _write(name, result, out, seed)
    print(f"{name}: {result['wall_s']} s wall", flush=True)


def _write(name: str, result: dict[str, Any], out: Path, seed: int) -> None:
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    (out / "results" / f"traffic_{name}.json").write_text(text)
    if name == "scale":
        big = result["runs"][-1]
        d = big["designs"]
        keep = ("token_hit_rate", "bytes_per_saved_token", "hottest_node_load")
        chat = {
            "nodes": big["nodes"],
            "simulated_s": big["simulated_s"],
            "wall_s": big["wall_s"],
            "seed": seed,
            "designs": {k: {f: d[k].get(f) for f in keep} for k in DESIGNS},
            "oracle_belady": d.get("oracle_belady"),
            "mesh_over_oracle_lru": round(
                d["mesh"]["token_hit_rate"] / d["oracle_lru"]["token_hit_rate"], 3
            ),
            "mesh_over_no_sharing": round(
                d["mesh"]["token_hit_rate"] / d["no_sharing"]["token_hit_rate"], 3
            ),
            "mesh_hottest_directory_load": d["mesh"]["hottest_directory_load"],
        }
        text = json.dumps(chat, indent=1, sort_keys=True) + "\n"
        (out / "results" / "traffic_chat_1000.json").write_text(text)
    _plot(name, result, out)


if __name__ == "__main__":
    raise SystemExit(main())
