"""``meshkv bench route``: routing policies over several real engines, with and without the mesh.

``--engines`` (default 2) vLLM OpenAI servers, each with the meshkv connector and its own
agent (CPU tier large enough for everything), behind ``meshkv proxy --engines ...``. The
multi-round chat workload of ``bench serve`` (users interleaved, each round's prompt the
conversation so far, requests carry ``user``) runs closed loop through the proxy once per
policy: ``cache_aware`` (``--agents``: the proxy asks every agent ``POST /v1/prefix``),
``round_robin``, ``random``, ``sticky`` (session affinity by ``user``). Engines and agents
stay up across policies; each policy gets fresh conversations, so none inherits another's
cache. Two stacks:

* **no mesh** — the agents do not know each other: a conversation's earlier rounds help
  only on the engine that served them, so where a request lands decides whether it hits;
* **mesh** — the agents form a mesh: a round that lands elsewhere pulls the conversation's
  chunks from the node that has them, so routing matters less.

Per run: TTFT p50/p99, requests/s, the share of prompt tokens not computed (vLLM's prefix
cache plus the connector, from the engines' ``/metrics``), and the load spread (requests of
the busiest engine over the mean). JSON: ``ttft_p50_cache_aware`` against round robin
without the mesh (target <= 0.5) and ``load_spread`` of cache-aware without the mesh (target
<= 1.3); the same pair with the mesh, and round robin with the mesh against without.

Two or three engines share this machine's two cores, so absolute TTFTs are high; the
comparison is between policies on the same stack, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from meshkv.bench import openai_load as load
from meshkv.bench import serve
from meshkv.bench.args import csv_of, model_arg, positive_int
from meshkv.bench.report import Report, Result, ms, text_table
from meshkv.bench.scratch import WORKDIR_HELP, run_in_scratch
from meshkv.launch import (
    AgentProcess,
    HttpProcess,
    LaunchError,
    engine_env,
    free_port,
    http_get,
    meshkv_kv_transfer_config,
    prometheus_sum,
    vllm_server_command,
)

logger = logging.getLogger(__name__)

POLICIES = ("cache_aware", "round_robin", "random", "sticky")


@dataclass(slots=True)
class RouteRun:
    """One policy on one stack."""

    policy: str
    mesh: bool
    summary: load.Summary
    requests_per_engine: list[int]
    hit_rate: float
    """Prompt tokens not computed (engine prefix cache + connector) over prompt tokens."""
    load_spread: float
    load_avg: float
    ttfts: list[float] = field(default_factory=list)


class Stack:
    """N agents (meshed or not) and N engines; proxies come and go per policy."""

    def __init__(self, workdir: Path, mesh: bool) -> None:
        self.workdir = workdir
        self.mesh = mesh
        self.agents: list[AgentProcess] = []
        self.engines: list[HttpProcess] = []

    def engine_counters(self) -> dict[str, float]:
        out = {"prompt": 0.0, "cached": 0.0}
        for engine in self.engines:
            text = http_get(engine.base_url + "/metrics", timeout=10).decode()
            out["prompt"] += prometheus_sum(text, "vllm:prompt_tokens_total")
            out["cached"] += prometheus_sum(text, "vllm:prefix_cache_hits_total")
            out["cached"] += prometheus_sum(text, "vllm:external_prefix_cache_hits_total")
        return out

    def close(self) -> None:
        for engine in self.engines:
            engine.stop()
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.stop()
            agent.cleanup()


@contextlib.contextmanager
def start_stack(
    args: argparse.Namespace, model: str, size: serve.ArmSizes, workdir: Path, mesh: bool
) -> Iterator[Stack]:
    stack = Stack(workdir, mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        mesh_args: list[str] = []
        if mesh:
            secret = workdir / "secret"
            secret.write_text(os.urandom(24).hex())
            secret.chmod(0o600)
            mesh_args = ["--mesh-secret-file", str(secret), "--listen", "127.0.0.1:0"]
        for i in range(args.engines):
            join: list[str] = []
            if mesh and stack.agents:
                join = ["--join", stack.agents[0].get_json("/v1/status")["mesh"]["address"]]
            agent = AgentProcess(
                name=f"route-{i}", cpu_bytes=size.cpu_tier, log_level="warning",
                args=[*mesh_args, *join],
            ).start()  # fmt: skip
            stack.agents.append(agent)
        for i, agent in enumerate(stack.agents):
            port = free_port()
            transfer = meshkv_kv_transfer_config(agent.socket_path, chunk_tokens=serve.CHUNK_TOKENS)
            cmd = vllm_server_command(
                sys.executable, model, port, kv_transfer_config=transfer, prefix_caching=True,
                kv_cache_memory_bytes=size.engine_kv, max_model_len=size.max_model_len,
                extra=["--max-num-batched-tokens", str(max(size.max_model_len, 2048))],
            )  # fmt: skip
            engine = HttpProcess(
                f"engine-{i}", cmd, f"http://127.0.0.1:{port}", env=engine_env(os.environ),
                log_path=workdir / f"engine-{i}.log",
            )  # fmt: skip
            stack.engines.append(engine)
            engine.start(serve.SERVER_TIMEOUT_S)
        yield stack
    finally:
        stack.close()


@contextlib.contextmanager
def proxy(stack: Stack, policy: str) -> Iterator[HttpProcess]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "meshkv", "proxy", "--listen", f"127.0.0.1:{port}",
        "--engines", *(e.base_url for e in stack.engines), "--routing", policy,
        "--agents", *(a.url for a in stack.agents), "--log-level", "warning",
    ]  # fmt: skip
    server = HttpProcess(
        f"proxy-{policy}", cmd, f"http://127.0.0.1:{port}",
        log_path=stack.workdir / f"proxy-{policy}.log",
    )  # fmt: skip
    server.start(60)
    try:
        yield server
    finally:
        server.stop()


def run_policy(
    stack: Stack, args: argparse.Namespace, policy: str, seed: int, vocab: int
) -> RouteRun:
    users = serve.chat_users(args.shape, seed, vocab)
    before = stack.engine_counters()
    load_before = os.getloadavg()[0]
    with proxy(stack, policy) as front:
        driven = load.drive(front.base_url, users, concurrency=args.concurrency)
        results, seconds = asyncio.run(driven)
        rows = json.loads(http_get(front.base_url + "/v1/upstreams"))["upstreams"]
    after = stack.engine_counters()
    per_engine = [int(r["requests"]) for r in rows]
    prompt = after["prompt"] - before["prompt"]
    cached = after["cached"] - before["cached"]
    mean = sum(per_engine) / max(1, len(per_engine))
    summary = load.summarize(results, seconds)
    run = RouteRun(
        policy, stack.mesh, summary, per_engine,
        hit_rate=cached / prompt if prompt else 0.0,
        load_spread=max(per_engine) / mean if mean else 0.0,
        load_avg=(load_before + os.getloadavg()[0]) / 2,
        ttfts=sorted(r.ttft_s for r in results if r.ok and r.ttft_s is not None),
    )  # fmt: skip
    logger.info(
        "%s mesh=%s: %d ok, %d failed, TTFT p50 %s ms, hit rate %.2f, per engine %s",
        policy, stack.mesh, summary.completed, summary.failed, ms(summary.ttft_p50),
        run.hit_rate, per_engine,
    )  # fmt: skip
    return run


def build_report(runs: list[RouteRun], args: argparse.Namespace) -> Report:
    report = Report("route")

    def find(policy: str, mesh: bool) -> RouteRun | None:
        return next((r for r in runs if (r.policy, r.mesh) == (policy, mesh)), None)

    def ttft(name: str, run: RouteRun | None, base_name: str, base: RouteRun | None) -> None:
        if run is None or run.summary.ttft_p50 is None:
            return
        bv = None if base is None else base.summary.ttft_p50
        report.add(
            Result(name, run.summary.ttft_p50 * 1000, "ms", baseline=base_name if bv else None,
                   baseline_value=None if bv is None else bv * 1000)
        )  # fmt: skip

    for mesh, suffix in ((False, ""), (True, "_mesh")):
        ca, rr = find("cache_aware", mesh), find("round_robin", mesh)
        ttft(f"ttft_p50_cache_aware{suffix}", ca, f"round robin{suffix.replace('_', ' ')}", rr)
        for other in ("random", "sticky"):
            ttft(f"ttft_p50_cache_aware{suffix}_vs_{other}", ca, other, find(other, mesh))
        if ca is not None:
            report.add(Result(f"load_spread{suffix}", ca.load_spread, "x"))
            report.add(
                Result(f"hit_rate_cache_aware{suffix}", ca.hit_rate, "fraction", None,
                       "round robin", None if rr is None else rr.hit_rate)
            )  # fmt: skip
    ttft("ttft_p50_round_robin_mesh", find("round_robin", True), "round robin, no mesh",
         find("round_robin", False))  # fmt: skip
    failed = sum(r.summary.failed for r in runs)
    report.add(Result("failed_requests", float(failed), "requests"))
    report.meta.update(
        engines=args.engines,
        concurrency=args.concurrency,
        shape=asdict(args.shape),
        runs=[
            {**{k: v for k, v in asdict(r).items() if k != "ttfts"}, "ttft_s": r.ttfts}
            for r in runs
        ],  # fmt: skip
    )
    return report


def runs_table(runs: list[RouteRun]) -> str:
    head = ("mesh", "policy", "ok", "fail", "req/s", "ttft p50", "p99", "hit rate",
            "per engine", "spread", "la")  # fmt: skip
    rows = [head]
    for r in runs:
        s = r.summary
        rows.append(
            (
                "yes" if r.mesh else "no",
                r.policy,
                str(s.completed),
                str(s.failed),
                f"{s.requests_per_s:.2f}",
                ms(s.ttft_p50),
                ms(s.ttft_p99),
                f"{r.hit_rate:.2f}",
                "/".join(map(str, r.requests_per_engine)),
                f"{r.load_spread:.2f}",
                f"{r.load_avg:.1f}",
            )  # fmt: skip
        )
    return text_table(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=model_arg, help="model directory vLLM loads")
    p.add_argument("--engines", type=positive_int, default=2, help="engines (and agents)")
    p.add_argument("--policies", type=csv_of(POLICIES), default=list(POLICIES))
    p.add_argument(
        "--stacks", type=csv_of(("nomesh", "mesh")), default=["nomesh", "mesh"],
        help="nomesh,mesh",
    )  # fmt: skip
    p.add_argument("--concurrency", type=positive_int, default=4)
    p.add_argument("--users", type=positive_int, default=16)
    p.add_argument("--rounds", type=positive_int, default=4)
    p.add_argument("--system-tokens", type=positive_int, default=1000)
    p.add_argument("--answer-tokens", type=positive_int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help=WORKDIR_HELP)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.shape = shape = serve.Shape(
        users=args.users, rounds=args.rounds, system_tokens=args.system_tokens,
        answer_tokens=args.answer_tokens,
    )  # fmt: skip
    per_token = serve.kv_bytes_per_token(args.model)
    vocab = serve.vocab_size(args.model)
    try:
        size = serve.sizes(shape, "chat", per_token, len(args.policies))
    except ValueError as exc:
        print(f"meshkv bench route: {exc}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    runs: list[RouteRun] = []
    errors: dict[str, str] = {}
    for name in args.stacks:
        mesh = name == "mesh"
        try:
            with start_stack(args, args.model, size, workdir / name, mesh) as stack:
                for engine in stack.engines:
                    serve._warm_server(engine.base_url, vocab)
                for i, policy in enumerate(args.policies):
                    # The same conversations for each stack; fresh ones for each policy.
                    seed = args.seed * 1000 + 500 + i
                    runs.append(run_policy(stack, args, policy, seed, vocab))
        except (LaunchError, OSError) as exc:
            logger.error("stack %s failed: %s", name, exc)
            errors[name] = str(exc)[-2000:]
    report = build_report(runs, args)
    report.meta["stack_errors"] = errors
    print(runs_table(runs))
    print()
    print(report.table())
    report.write(args.json)
    return 1 if errors else 0


def run(args: argparse.Namespace) -> int:
    """The run in ``--workdir``, or in a temporary directory removed when it passes."""
    return run_in_scratch(_run, args, prefix="mkv-route-", command="meshkv bench route")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshkv bench route")
    p.add_argument("--json", metavar="FILE")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
