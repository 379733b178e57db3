"""The engine jobs behind the arms of ``meshkv bench vllm``.

:func:`run_engine_job` runs one ``vllm_runner`` process (one engine) to completion; the
LMCache server and its venv live in :mod:`meshkv.bench.lmcache` (``bench serve`` uses them
too).
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from meshkv.bench.lmcache import (
    ArmError,
    LMCacheServer,
    ensure_lmcache_venv,
    fetch_status,
    kill_group,
    log_tail,
)

__all__ = ["ArmError", "LMCacheServer", "ensure_lmcache_venv", "fetch_status", "run_engine_job"]

logger = logging.getLogger(__name__)


def run_engine_job(
    python: str,
    job: dict[str, Any],
    env: dict[str, str],
    workdir: Path,
    name: str,
    timeout_s: float,
) -> dict[str, Any]:
    """Run ``python -m benchmarks.vllm_runner`` on ``job``; return its result record."""
    job_path = workdir / f"{name}.job.json"
    out_path = workdir / f"{name}.result.json"
    log_path = workdir / f"{name}.log"
    job_path.write_text(json.dumps(job))
    cmd = [python, "-m", "benchmarks.vllm_runner", str(job_path), str(out_path)]
    logger.info("engine job %s: %s (log %s)", name, " ".join(cmd), log_path)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise ArmError(
                f"engine job {name} timed out after {timeout_s:.0f} s: {' '.join(cmd)}\n"
                f"{log_tail(log_path)}"
            ) from None
        finally:
            # vLLM's engine-core and worker children must not outlive the job.
            kill_group(proc)
    if code != 0 or not out_path.exists():
        raise ArmError(
            f"engine job {name} failed (exit {code}): {' '.join(cmd)}\n{log_tail(log_path)}"
        )
    result: dict[str, Any] = json.loads(out_path.read_text())
    result["log"] = str(log_path)
    return result
