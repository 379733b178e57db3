"""Fixtures for the real-vLLM tests: the tiny model, agents, and engine processes.

Every engine runs in its own subprocess (``meshkv.testing.engine_job``): vLLM engines do
not share an interpreter well, and a fresh process per engine is also what cross-process
reuse needs.
All engines get the same CPU thread binding, so outputs with and without the connector
are computed the same way and can be compared token for token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # for `tests.helpers`

from meshkv.testing.tiny_llama import build_tiny_llama, default_cache_dir  # noqa: E402
from tests.helpers.agents import AgentProcess  # noqa: E402
from tests.vllm.engines import (  # noqa: E402
    ENGINE_TIMEOUT_S,
    PROMPTS,
    EngineRun,
    Prompts,
)

JOB_MODULE = ["-m", "meshkv.testing.engine_job"]


def _cpu_list() -> str:
    """This process's CPUs as vLLM's bind syntax (``0-1`` or ``0,2,3``)."""
    cpus = sorted(os.sched_getaffinity(0))
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # The same binding for every engine (FACTS.md: 'auto' gives connector engines more
    # cores, which also changes float reduction order).
    "VLLM_CPU_OMP_THREADS_BIND": _cpu_list(),
    "PYTHONPATH": str(REPO),
}


@pytest.fixture(scope="session")
def prompts() -> Prompts:
    return PROMPTS


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny random Llama (built once, cached by config hash)."""
    cache = default_cache_dir() if os.environ.get("MESHKV_CACHE") else None
    root = cache or tmp_path_factory.mktemp("models")
    return str(build_tiny_llama(cache_dir=root))


@pytest.fixture
def engine(tiny_model: str, tmp_path: Path) -> Iterator[Callable[..., EngineRun]]:
    """Start engine jobs: ``engine(prompts, connector={...} | None, **job_fields)``."""
    runs: list[EngineRun] = []

    def start(
        prompts: list[list[int]], connector: dict[str, Any] | None = None, **fields: Any
    ) -> EngineRun:
        workdir = tmp_path / f"engine-{len(runs)}"
        workdir.mkdir()
        job = {
            "model": tiny_model,
            "prompts": prompts,
            "connector": connector,
            "sync_dir": str(workdir),
            **fields,
        }
        (workdir / "job.json").write_text(json.dumps(job))
        env = dict(os.environ, **ENGINE_ENV)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if fields.get("multiprocess") else "0"
        log_path = workdir / "engine.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, *JOB_MODULE, str(workdir / "job.json"),
                 str(workdir / "result.json")],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(workdir),
            )  # fmt: skip
        run = EngineRun(proc, workdir, log_path)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()


@pytest.fixture(scope="session")
def baseline(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    """Greedy outputs of every prompt from an engine with no connector."""
    workdir = tmp_path_factory.mktemp("baseline")
    names = ("a", "b", "c", "d")
    job = {
        "model": tiny_model,
        "prompts": [getattr(PROMPTS, n) for n in names],
        "connector": None,
    }
    (workdir / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, **ENGINE_ENV, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(
        [sys.executable, *JOB_MODULE, str(workdir / "job.json"), str(workdir / "result.json")],
        env=env, capture_output=True, timeout=ENGINE_TIMEOUT_S, cwd=str(workdir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout.decode()[-4000:] + proc.stderr.decode()[-4000:]
    result = json.loads((workdir / "result.json").read_text())
    return {n: out["tokens"] for n, out in zip(names, result["outputs"], strict=True)}


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Build (not start) agents with an SSD directory; all are cleaned up after the test."""
    made: list[AgentProcess] = []

    def make(**kwargs: Any) -> AgentProcess:
        kwargs.setdefault("ssd_dir", tmp_path / f"ssd-{len(made)}")
        Path(kwargs["ssd_dir"]).mkdir(exist_ok=True)
        kwargs.setdefault("cpu_bytes", 128 << 20)
        agent = AgentProcess(name=f"vllm-agent-{len(made)}", **kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.cleanup()
