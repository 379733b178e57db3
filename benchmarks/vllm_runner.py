"""One vLLM engine, one benchmark job: ``python -m benchmarks.vllm_runner JOB OUT``.

The parent (``meshkv bench vllm``) writes a JSON job — the model directory, the engine
settings of one arm and an ordered list of requests — and starts this module in a fresh
process, in whichever virtual environment the arm needs (the LMCache arm has its own).
The runner starts one engine, sends the requests one at a time with ``max_tokens=1``
(so the request latency is the time to first token), and writes the timings to ``OUT``.

Every engine setting that matters for fairness (thread binding, multiprocessing mode) is
set by the parent through the environment before this process imports vLLM. The module
imports nothing from meshkv, so it runs in a venv where meshkv is only on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

JOB_VERSION = 1
"""Bumped when the job or result shape changes (parent and runner must agree)."""


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Settings of the engine of one arm (everything else is vLLM's default)."""

    model: str
    """Directory of the model (weights, config, tokenizer)."""
    prefix_caching: bool
    """vLLM's own prefix cache."""
    kv_transfer_config: dict[str, Any] | None
    """``kv_transfer_config`` for an external KV connector, or None for none."""
    kv_cache_memory_bytes: int
    """Size of the engine's own KV cache."""
    block_size: int
    """Engine block size in tokens."""
    max_model_len: int
    """Longest prompt plus output the engine accepts."""
    max_num_batched_tokens: int
    """Tokens per engine step (equal to ``max_model_len``: a prompt prefills in one step)."""
    dtype: str = "auto"
    """Compute dtype (``auto`` = the checkpoint's)."""
    enforce_eager: bool = False
    """Skip vLLM's graph capture (start-up is faster; prefill speed is compared in docs)."""
    seed: int = 0
    """Sampling seed (greedy sampling anyway)."""
    profile_connector: bool = False
    """Run in one process (``uni`` executor; the parent also sets
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and time every connector hook per request."""


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One timed request."""

    rid: str
    """Unique id within the job (``doc3-q1``)."""
    workload: str
    """Workload it belongs to (``longdoc``, ``chat``, ``unique``)."""
    phase: str
    """``cold`` (nothing reusable should exist) or ``warm`` (a prefix was served before)."""
    tokens: list[int]
    """Prompt token ids."""
    gap_s: float = 0.0
    """Untimed sleep before the request (asynchronous stores finish in it)."""


@dataclass(frozen=True, slots=True)
class Job:
    """What one runner process does."""

    engine: EngineSpec
    requests: list[RequestSpec]
    warmup: list[list[int]] = field(default_factory=list)
    """Untimed prompts sent first (kernels warm up; their KV is unique and never reused)."""
    version: int = JOB_VERSION

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        if data.get("version") != JOB_VERSION:
            raise ValueError(f"job version {data.get('version')!r}, runner expects {JOB_VERSION}")
        return cls(
            engine=EngineSpec(**data["engine"]),
            requests=[RequestSpec(**r) for r in data["requests"]],
            warmup=[list(map(int, w)) for w in data.get("warmup", [])],
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Timing:
    """The measured outcome of one request."""

    rid: str
    workload: str
    phase: str
    prompt_tokens: int
    ttft_s: float
    """Wall time of ``LLM.generate`` for this one request with ``max_tokens=1``."""
    cached_tokens: int
    """Tokens the engine did not compute (its prefix cache plus the connector's hits)."""
    first_token: int
    """The greedy first output token (compared across arms as a correctness check)."""
    connector_s: float = 0.0
    """Time spent inside the connector's hooks (``profile_connector`` jobs only)."""
    connector_calls: dict[str, float] = field(default_factory=dict)
    """Seconds per hook name (``profile_connector`` jobs only)."""


# The connector hooks vLLM calls (both roles); a profiled job times each of them.
HOOKS = (
    "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
    "update_connector_output", "request_finished", "start_load_kv", "wait_for_layer_load",
    "save_kv_layer", "wait_for_save", "get_finished", "get_block_ids_with_load_errors",
)  # fmt: skip


def instrument_connector(kv_transfer_config: dict[str, Any]) -> dict[str, float]:
    """Wrap the connector class's hooks with timers; returns the live per-hook totals."""
    import functools
    import importlib

    module = importlib.import_module(kv_transfer_config["kv_connector_module_path"])
    cls = getattr(module, kv_transfer_config["kv_connector"])
    totals: dict[str, float] = {}

    def wrap(name: str) -> None:
        original = getattr(cls, name)

        @functools.wraps(original)
        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

        setattr(cls, name, timed)

    for hook in HOOKS:
        if hasattr(cls, hook):
            wrap(hook)
    return totals


def run_job(job: Job) -> dict[str, Any]:
    """Start the engine, run the job's requests in order, and return the result record."""
    t_start = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = job.engine
    totals: dict[str, float] = {}
    extra: dict[str, Any] = {}
    if spec.profile_connector:
        if spec.kv_transfer_config is None:
            raise ValueError("profile_connector needs a kv_transfer_config")
        totals = instrument_connector(spec.kv_transfer_config)
        extra["distributed_executor_backend"] = "uni"
    t_import = time.perf_counter()
    llm = LLM(
        model=spec.model,
        skip_tokenizer_init=True,
        enable_prefix_caching=spec.prefix_caching,
        kv_transfer_config=spec.kv_transfer_config,
        kv_cache_memory_bytes=spec.kv_cache_memory_bytes,
        block_size=spec.block_size,
        max_model_len=spec.max_model_len,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        max_num_seqs=8,
        enforce_eager=spec.enforce_eager,
        dtype=spec.dtype,  # type: ignore[arg-type]  # checked by vLLM
        seed=spec.seed,
        disable_log_stats=True,
        **extra,
    )
    t_ready = time.perf_counter()
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

    def one(tokens: list[int]) -> tuple[float, Any]:
        prompt = TokensPrompt(prompt_token_ids=tokens)
        t0 = time.perf_counter()
        outs = llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - t0, outs[0]

    for tokens in job.warmup:
        one(tokens)
    timings: list[Timing] = []
    busy = 0.0
    for req in job.requests:
        if req.gap_s > 0:
            time.sleep(req.gap_s)
        totals.clear()
        elapsed, out = one(req.tokens)
        busy += elapsed
        first = out.outputs[0].token_ids[0] if out.outputs and out.outputs[0].token_ids else -1
        timings.append(
            Timing(
                rid=req.rid,
                workload=req.workload,
                phase=req.phase,
                prompt_tokens=len(req.tokens),
                ttft_s=elapsed,
                cached_tokens=int(out.num_cached_tokens or 0),
                first_token=int(first),
                connector_s=sum(totals.values()),
                connector_calls=dict(totals),
            )
        )
    t_done = time.perf_counter()
    return {
        "version": JOB_VERSION,
        "import_s": t_import - t_start,
        "engine_start_s": t_ready - t_import,
        "requests_s": t_done - t_ready,
        "busy_s": busy,
        "timings": [asdict(t) for t in timings],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m benchmarks.vllm_runner JOB.json OUT.json", file=sys.stderr)
        return 2
    job = Job.from_json(json.loads(Path(argv[0]).read_text()))
    result = run_job(job)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
