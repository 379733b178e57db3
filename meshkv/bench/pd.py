"""``meshkv bench pd``: prefill/decode disaggregation against aggregated engines, measured.

Everything runs here on real processes, one arm after the other, with the same prompts and
the same closed-loop load (``--concurrency`` requests always in flight, no pause between
requests: every asynchronous cost is on the clock):

* ``agg1`` — one vLLM OpenAI server, no connector (the baseline);
* ``agg2`` — two such servers behind ``meshkv proxy --engines ... --routing round_robin``;
* ``pd``   — two meshkv agents in a mesh, a prefill and a decode server with the meshkv
  connector, ``meshkv proxy --prefill ... --decode ...`` (chunks pushed to the decode node).

Per arm: TTFT p50/p99, inter-token latency (ITL) p50/p99, time per output token, requests/s
and output tokens/s, failed requests. Then, on the ``pd`` stack:

* **transfer** — prompts sent the way vLLM's toy proxy sends them (prefill, then decode with
  the prefill's parameters; no push target, so the decode agent pulls): the decode agent's
  wait from the lookup to the last chunk (``meshkv_transfer_wait_seconds``) and the bytes it
  received, against the same bytes at the raw loopback TCP rate measured in the same run,
  alternating with the transfers while the servers are up (``transfer_over_raw_socket``;
  target <= 1.25; both are means over the transfers), and the transfer's share of the
  decode-side TTFT (mean wait over mean TTFT; the median and the slowest TTFT are in the
  JSON's ``meta.extra.transfer``). With ``--own-core`` (the default where the CPUs can be
  split) every transfer is also timed with the engines on all CPUs but the last and the
  agents (and the raw baseline) on the last, alternating with the shared placement:
  ``transfer_over_raw_socket_own_core`` says what the path costs when the agents are not
  competing with two engines' busy loops for two cores;
* **mesh-warm vs local-warm** — a document prefilled on the prefill engine, then asked about
  again on the same engine (its agent has the chunks: local-warm) and on the decode engine
  (its agent pulls them through the mesh: mesh-warm), each after a 1.3 s pause that lets
  the engine asked before stop spinning (``SETTLE_S``); ``mesh_warm_over_local_warm`` is
  the ratio of median TTFTs (target <= 1.3); ``mesh_warm_recomputed_docs`` counts documents the
  decode engine computed instead (vLLM's own counter), which explains a slow median.

Needs a model vLLM can load (``--model``); ``python -m benchmarks.pd`` in the source tree
runs it on a small random Llama. On a 2-core machine both engines of ``agg2`` and ``pd``
share the same two cores, so P/D's decode-latency benefit (prefills no longer interrupt
decoding) cannot show here; the numbers say what the disaggregation costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from meshkv.bench import affinity
from meshkv.bench import openai_load as load
from meshkv.bench.args import int_range, model_arg, positive_int
from meshkv.bench.report import Report, Result
from meshkv.bench.scratch import WORKDIR_HELP, run_in_scratch
from meshkv.bench.serve import kv_bytes_per_token
from meshkv.launch import (
    AgentProcess,
    HttpProcess,
    computed_prompt_tokens,
    engine_env,
    free_port,
    http_get,
    http_post_json,
    listen_args,
    meshkv_kv_transfer_config,
    vllm_server_command,
)

ARMS = ("agg1", "agg2", "pd")
SERVER_TIMEOUT_S = 300.0
TRANSFER_TOKENS = 3072
"""Prompt length of the toy-flow transfers (24 MiB of KV with the bench model)."""
RAW_ROUNDS = 3
"""Raw-socket rounds of the transfer's size before each transfer."""
SETTLE_S = 1.3
"""Pause before each timed warm request: vLLM's shared-memory queue readers (worker and
engine core) busy-loop with ``sched_yield`` for 1 s after every read (``SpinCondition``,
``busy_loop_s=1``). On a 2-core machine the engine that answered last thus takes a core
for a second from the engine asked next: a mesh-warm request sent right after the
local-warm one on the other engine took 1.02-1.04 s instead of 0.1 s (3 of 10 documents),
with the prefill worker burning 0.84-0.89 s of CPU meanwhile. Nothing of meshkv's is
pending during the pause: the chunks are committed and announced before it."""
WARM_CHUNK_TOKENS = 256
"""A mesh-warm request whose decode engine computed more than this (one chunk of the
connector's default size) did not load the document: counted as recomputed."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, type=model_arg, help="model directory (or id) vLLM loads"
    )
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run")
    p.add_argument("--requests", type=positive_int, default=24, help="requests per arm")
    p.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight")
    p.add_argument(
        "--prompt-tokens", type=int_range, default="2048-4096", help="prompt length range"
    )
    p.add_argument("--output-tokens", type=int_range, default="32-64", help="answer length range")
    p.add_argument("--transfers", type=positive_int, default=6, help="toy-flow transfers to time")
    p.add_argument(
        "--warm-docs", type=positive_int, default=4, help="documents for mesh/local warm"
    )
    p.add_argument(
        "--own-core",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time each transfer with the agents on a CPU of their own, alternating "
        "with the shared placement (Linux, 2+ CPUs)",
    )
    p.add_argument("--transport", default="tcp", choices=("tcp", "ucx"))
    p.add_argument("--kv-cache-bytes", type=positive_int, default=512 << 20, help="engine KV cache")
    p.add_argument("--agent-cpu-bytes", type=positive_int, default=2 << 30, help="agent CPU tier")
    p.add_argument("--max-model-len", type=positive_int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="FILE.png", help="write TTFT CDFs per arm (matplotlib)")
    p.add_argument("--workdir", help=WORKDIR_HELP)


def _vocab(model: str) -> int:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    return 1000


def _prompts(rng: random.Random, n: int, lengths: tuple[int, int], vocab: int) -> list[list[int]]:
    top = min(vocab - 1, 30000)
    return [[rng.randrange(3, top) for _ in range(rng.randint(*lengths))] for _ in range(n)]


class Stack:
    """The processes of one arm; stopped (and their files removed) by ``close``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[HttpProcess] = []
        self.agents: list[AgentProcess] = []
        self.url = ""

    def server(
        self, args: argparse.Namespace, name: str, agent: AgentProcess | None
    ) -> HttpProcess:
        port = free_port()
        transfer = None
        if agent is not None:
            transfer = meshkv_kv_transfer_config(agent.socket_path, save_decode_tokens=True)
        cmd = vllm_server_command(
            sys.executable, args.model, port, served_name="model", kv_transfer_config=transfer,
            kv_cache_memory_bytes=args.kv_cache_bytes, max_model_len=args.max_model_len,
            extra=["--max-num-batched-tokens", str(args.max_model_len)],
        )  # fmt: skip
        env = engine_env(os.environ)
        server = HttpProcess(
            name, cmd, f"http://127.0.0.1:{port}", env=env, log_path=self.workdir / f"{name}.log"
        )
        self.servers.append(server)
        return server.start(SERVER_TIMEOUT_S)

    def proxy(self, *args: str) -> HttpProcess:
        port = free_port()
        cmd = [sys.executable, "-m", "meshkv", "proxy", "--listen", f"127.0.0.1:{port}", *args]
        proxy = HttpProcess(
            "proxy", cmd, f"http://127.0.0.1:{port}", log_path=self.workdir / "proxy.log"
        )
        self.servers.append(proxy)
        proxy.start(60)
        self.url = proxy.base_url
        return proxy

    def close(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.stop()
            agent.cleanup()


@contextlib.contextmanager
def _arm(args: argparse.Namespace, name: str, workdir: Path) -> Iterator[Stack]:
    stack = Stack(workdir / name)
    stack.workdir.mkdir(parents=True, exist_ok=True)
    try:
        if name == "agg1":
            stack.url = stack.server(args, "engine", None).base_url
        elif name == "agg2":
            a = stack.server(args, "engine-a", None)
            b = stack.server(args, "engine-b", None)
            stack.proxy("--engines", a.base_url, b.base_url, "--routing", "round_robin")
        else:
            secret = stack.workdir / "secret"
            secret.write_text(os.urandom(24).hex())
            secret.chmod(0o600)
            mesh = ["--mesh-secret-file", str(secret), "--transport", args.transport]
            p_agent = AgentProcess(
                name="node-p", cpu_bytes=args.agent_cpu_bytes, log_level="warning",
                args=[*listen_args("127.0.0.1:0", args.transport), *mesh],
            ).start()  # fmt: skip
            stack.agents.append(p_agent)
            seed = p_agent.get_json("/v1/status")["mesh"]["address"]
            d_agent = AgentProcess(
                name="node-d", cpu_bytes=args.agent_cpu_bytes, log_level="warning",
                args=[*listen_args("127.0.0.1:0", args.transport), "--join", seed, *mesh],
            ).start()  # fmt: skip
            stack.agents.append(d_agent)
            p = stack.server(args, "prefill", p_agent)
            d = stack.server(args, "decode", d_agent)
            stack.proxy("--prefill", p.base_url, "--decode", d.base_url)
            _wait_for_push_target(stack.url)
        yield stack
    finally:
        stack.close()


def _wait_for_push_target(proxy_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = json.loads(http_get(proxy_url + "/v1/upstreams"))["upstreams"]
        if all(r["node"] for r in rows if r["role"] == "decode"):
            return
        time.sleep(0.25)
    raise RuntimeError("the proxy never learned the decode engine's agent")


def _specs(prompts: list[list[int]], outputs: list[int], tag: str) -> list[load.User]:
    return [
        load.User(
            f"{tag}-{i}",
            load.RequestSpec(
                f"{tag}-{i}",
                "/v1/completions",
                {
                    "model": "model",
                    "prompt": prompt,
                    "max_tokens": n,
                    "min_tokens": n,
                    "temperature": 0,
                    "ignore_eos": True,
                },
                tag=tag,
            ),
        )  # fmt: skip
        for i, (prompt, n) in enumerate(zip(prompts, outputs, strict=True))
    ]


def _post(url: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    data: dict[str, Any] = http_post_json(url, body)
    return data, time.perf_counter() - t0


def _metric(agent: AgentProcess, name: str) -> float:
    return agent.metric(name)


def _own_core(stack: Stack, placement: affinity.Placement) -> None:
    """Give the agents (and this process with the raw-socket baseline's server) the last
    CPU and the engines the others, as on a node where the agent has cores of its own."""
    cpus = sorted(os.sched_getaffinity(0))
    engines = affinity.process_tree(s.proc.pid for s in stack.servers if s.proc is not None)
    agents = affinity.process_tree(a.proc.pid for a in stack.agents if a.proc is not None)
    rest = [p for p in affinity.process_tree([os.getpid()]) if p not in engines + agents]
    placement.move(engines, set(cpus[:-1]))
    placement.move(agents + rest, {cpus[-1]})


def measure_transfers(
    stack: Stack, prompts: list[list[int]], raw_bytes: int, *, own_core: bool = False
) -> dict[str, float]:
    """The toy proxy's flow, one request at a time; the decode agent's transfer counters.
    Before each transfer, the raw-socket baseline moves ``raw_bytes`` over loopback TCP
    with the same servers up (ABAB: the engines' idle loops and the agents cost the
    baseline what they cost the transfer; measured once after the stack had stopped, it
    came out anywhere from 1.37 to 3.46 GB/s between runs). Its server and connection last
    the whole measurement (``RawTcpRounds``), as the agents' do: a fresh server per
    transfer gave the baseline a warm-up right before its timed part that the transfer,
    seconds after the last one, never gets.

    ``own_core``: every other transfer instead runs its decode leg with the agents on a
    CPU of their own (``_own_core``), the raw baseline right before it in the same
    placement (the ``own_core_*`` results): on two cores the decode worker's busy loop
    and the prefill engine's idle spin otherwise take the CPU the agents move bytes with."""
    from meshkv.bench.transport_baselines import RawTcpRounds

    raw_seconds = 0.0
    p, d = stack.servers[0], stack.servers[1]
    d_agent = stack.agents[1]
    names = ("meshkv_transfer_wait_seconds_sum", "meshkv_transfer_wait_seconds_count",
             "meshkv_transfer_received_bytes_total")  # fmt: skip
    toy = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
           "remote_block_ids": None, "remote_host": None, "remote_port": None}  # fmt: skip
    ttfts, waits, own_waits, own_raw = [], [], [], []
    total_wait = total_count = total_bytes = 0.0
    placement = affinity.Placement()
    with contextlib.closing(RawTcpRounds()) as raw:
        for i, prompt in enumerate(prompts):
            own = own_core and i % 2 == 1
            if not own:
                raw_seconds += raw_bytes * RAW_ROUNDS / (raw(raw_bytes, RAW_ROUNDS) * 1e9)
            body = {"model": "model", "prompt": prompt, "max_tokens": 1, "temperature": 0}
            first, _ = _post(p.base_url + "/v1/completions", {**body, "kv_transfer_params": toy})
            params = first.get("kv_transfer_params")
            if own:
                _own_core(stack, placement)
                own_raw.append(raw_bytes / (raw(raw_bytes, RAW_ROUNDS) * 1e9))
            before = {n: _metric(d_agent, n) for n in names}
            try:
                _, ttft = _post(
                    d.base_url + "/v1/completions", {**body, "kv_transfer_params": params}
                )
                # this transfer's wait (it ended before the decode engine answered)
                after = {n: _metric(d_agent, n) for n in names}
            finally:
                placement.restore()
            wait = after[names[0]] - before[names[0]]
            if own:
                own_waits.append(wait)
                continue
            ttfts.append(ttft)
            waits.append(wait)
            total_wait += wait
            total_count += after[names[1]] - before[names[1]]
            total_bytes += after[names[2]] - before[names[2]]
    out = {
        "transfers": total_count,
        "wait_s": total_wait / max(1.0, total_count),
        "bytes": total_bytes / max(1.0, total_count),
        "decode_ttft_s": statistics.median(ttfts),
        "decode_ttft_mean_s": statistics.fmean(ttfts),
        "decode_ttft_max_s": max(ttfts),
        "wait_p50_s": statistics.median(waits),
        "wait_max_s": max(waits),
        "raw_gbps": raw_bytes * RAW_ROUNDS * len(waits) / raw_seconds / 1e9,
    }
    if own_waits:
        out.update(
            own_core_transfers=float(len(own_waits)),
            own_core_wait_s=statistics.fmean(own_waits),
            own_core_wait_p50_s=statistics.median(own_waits),
            own_core_wait_max_s=max(own_waits),
            own_core_raw_s=statistics.fmean(own_raw),
        )
    return out


def measure_warm(stack: Stack, rng: random.Random, docs: int, vocab: int) -> dict[str, float]:
    """Cold on the prefill engine, then local-warm there, then mesh-warm on the decode one,
    each timed request after ``SETTLE_S`` (so that it starts with the other engine idle:
    both see the same machine). Also counts the documents the decode engine computed
    instead of loading (more than one chunk of the prompt: its lookup found no holder, e.g.
    the announcement had not reached the keys' home yet), read from vLLM's counter after
    each request (off the clock)."""
    p, d = stack.servers[0], stack.servers[1]
    local, mesh = [], []
    recomputed = 0
    for i in range(docs):
        doc = _prompts(rng, 1, (3072, 3072), vocab)[0]

        def ask(server: HttpProcess, seed: int, doc: list[int] = doc) -> float:
            q = [3 + (seed * 31 + j) % 500 for j in range(48)]
            body = {"model": "model", "prompt": doc + q, "max_tokens": 1, "temperature": 0}
            return _post(server.base_url + "/v1/completions", body)[1]

        ask(p, 3 * i)  # cold: computed and stored on node-p
        time.sleep(SETTLE_S)  # also lets the holders' 50 ms announcement batches go out
        local.append(ask(p, 3 * i + 1))
        before = computed_prompt_tokens(d)
        time.sleep(SETTLE_S)
        mesh.append(ask(d, 3 * i + 2))
        time.sleep(0.3)  # vLLM updates its counters after the step
        recomputed += computed_prompt_tokens(d) - before > WARM_CHUNK_TOKENS
    return {
        "local_warm_s": statistics.median(local),
        "mesh_warm_s": statistics.median(mesh),
        "local_warm_max_s": max(local),
        "mesh_warm_max_s": max(mesh),
        "mesh_warm_recomputed": float(recomputed),
        "docs": float(docs),
    }


def _run(args: argparse.Namespace) -> int:
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        print(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    vocab = _vocab(args.model)
    prompts = _prompts(rng, args.requests, args.prompt_tokens, vocab)
    lo, hi = args.output_tokens
    outputs = [rng.randint(lo, hi) for _ in prompts]
    workdir = Path(args.workdir)
    report = Report("pd")
    report.meta.update(
        requests=args.requests, concurrency=args.concurrency,
        prompt_tokens="{}-{}".format(*args.prompt_tokens),
        output_tokens="{}-{}".format(*args.output_tokens),
        transport=args.transport, model=args.model,
        loadavg_start=os.getloadavg()[0], cpus=os.cpu_count(),
    )  # fmt: skip
    summaries: dict[str, load.Summary] = {}
    ttfts: dict[str, list[float]] = {}
    extra: dict[str, dict[str, float]] = {}
    for arm in arms:
        with _arm(args, arm, workdir) as stack:
            # Warm-up: one request per engine path, untimed (kernels, connections).
            warm = _prompts(random.Random(99), 2, (256, 256), vocab)
            asyncio.run(load.drive(stack.url, _specs(warm, [4, 4], "warmup"), concurrency=2))
            results, seconds = asyncio.run(
                load.drive(stack.url, _specs(prompts, outputs, arm), concurrency=args.concurrency)
            )
            summaries[arm] = load.summarize(results, seconds)
            ttfts[arm] = [r.ttft_s for r in results if r.ok and r.ttft_s is not None]
            if arm == "pd":
                own_core = args.own_core and affinity.supported()
                count = args.transfers * (2 if own_core else 1)
                extra["transfer"] = measure_transfers(
                    stack,
                    _prompts(rng, count, (TRANSFER_TOKENS, TRANSFER_TOKENS), vocab),
                    TRANSFER_TOKENS * kv_bytes_per_token(args.model),
                    own_core=own_core,
                )
                extra["warm"] = measure_warm(stack, rng, args.warm_docs, vocab)
    _report(report, summaries, extra)
    report.meta["summaries"] = {a: asdict(s) for a, s in summaries.items()}
    report.meta["extra"] = extra
    report.meta["loadavg_end"] = os.getloadavg()[0]
    print(report.table())
    report.write(args.json)
    if args.plot:
        plot_cdfs(ttfts, args.plot, "TTFT by arm (closed loop)")
    return 0


def _report(
    report: Report, summaries: dict[str, load.Summary], extra: dict[str, dict[str, float]]
) -> None:
    base = summaries.get("agg1")
    for arm, s in summaries.items():
        b = base if arm != "agg1" else None
        for name, value, bvalue, unit in (
            ("ttft_p50", s.ttft_p50, b and b.ttft_p50, "s"),
            ("ttft_p99", s.ttft_p99, b and b.ttft_p99, "s"),
            ("itl_p50", s.itl_p50, b and b.itl_p50, "s"),
            ("itl_p99", s.itl_p99, b and b.itl_p99, "s"),
            ("tpot_p50", s.tpot_p50, b and b.tpot_p50, "s"),
            ("throughput", s.requests_per_s, b and b.requests_per_s, "req/s"),
            ("output_tokens_per_s", s.output_tokens_per_s, b and b.output_tokens_per_s, "tok/s"),
        ):
            if value is not None:
                report.add(Result(f"{name}_{arm}", value, unit, None,
                                  "agg1" if bvalue else None, bvalue or None))  # fmt: skip
    failed = sum(s.failed for s in summaries.values())
    report.add(Result("failed_requests", failed, "requests", None, "target", 0.0))
    transfer = extra.get("transfer")
    if transfer and transfer["transfers"]:
        raw = transfer["raw_gbps"]
        ideal = transfer["bytes"] / (raw * 1e9)
        report.add(Result("transfer_s", transfer["wait_s"], "s", int(transfer["bytes"]),
                          "bytes_at_raw_tcp", ideal))  # fmt: skip
        report.add(Result("transfer_over_raw_socket", transfer["wait_s"] / ideal, "x",
                          int(transfer["bytes"]), "target", 1.25))  # fmt: skip
        for stat in ("p50", "max"):  # one slow transfer moves the mean: show the spread
            report.add(Result(f"transfer_{stat}_s", transfer[f"wait_{stat}_s"], "s",
                              int(transfer["bytes"]), "bytes_at_raw_tcp", ideal))  # fmt: skip
        share = transfer["wait_s"] / transfer["decode_ttft_mean_s"]
        report.add(Result("transfer_share_of_decode_ttft", share, "fraction"))
        report.meta["raw_tcp_gbps"] = raw
        if transfer.get("own_core_transfers"):
            own_ideal = transfer["own_core_raw_s"]
            report.add(Result("transfer_own_core_s", transfer["own_core_wait_s"], "s",
                              int(transfer["bytes"]), "bytes_at_raw_tcp", own_ideal))  # fmt: skip
            report.add(Result("transfer_over_raw_socket_own_core",
                              transfer["own_core_wait_s"] / own_ideal, "x",
                              int(transfer["bytes"]), "target", 1.25))  # fmt: skip
    warm = extra.get("warm")
    if warm:
        report.add(Result("ttft_local_warm", warm["local_warm_s"], "s"))
        report.add(Result("ttft_mesh_warm", warm["mesh_warm_s"], "s", None, "local_warm",
                          warm["local_warm_s"]))  # fmt: skip
        ratio = warm["mesh_warm_s"] / warm["local_warm_s"]
        report.add(Result("mesh_warm_over_local_warm", ratio, "x", None, "target", 1.3))
        report.add(Result("mesh_warm_recomputed_docs", warm["mesh_warm_recomputed"], "docs",
                          None, "docs", warm["docs"]))  # fmt: skip


def plot_cdfs(series: dict[str, list[float]], path: str, title: str) -> None:
    """One CDF curve per arm (matplotlib, written as PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in series.items():
        data = sorted(values)
        if not data:
            continue
        ys = [(i + 1) / len(data) for i in range(len(data))]
        ax.step(data, ys, where="post", label=f"{name} (n={len(data)})")
    ax.set_xlabel("seconds")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """The run in ``--workdir``, or in a temporary directory removed when it passes."""
    return run_in_scratch(_run, args, prefix="mkv-bench-pd-", command="meshkv bench pd")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshkv bench pd", description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
