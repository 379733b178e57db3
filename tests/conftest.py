"""The suite's fixtures, in one place: agents, the tiny model, engine jobs, OpenAI servers.

Every process is real and started through ``meshkv.launch`` (the same harness the
benchmarks and the demo use). Engines run in subprocesses (``benchmarks.engine_job``):
vLLM engines do not share an interpreter well, and a fresh process per engine is also what
cross-process reuse needs. All engines get the same CPU thread binding
(``meshkv.launch.engine_env``), so outputs with and without the connector are computed the
same way and can be compared token for token.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.tiny_llama import build_tiny_llama, default_cache_dir
from meshkv.launch import (
    AgentProcess,
    HttpProcess,
    engine_env,
    free_port,
    meshkv_kv_transfer_config,
    new_rpc_dir,
    vllm_server_command,
)
from tests.helpers.logs import FAILED, kept_logs
from tests.helpers.warm_engines import WarmEngines
from tests.vllm.engines import ENGINE_TIMEOUT_S, PROMPTS, EngineRun, Prompts

REPO = Path(__file__).resolve().parents[1]
JOB_MODULE = ["-m", "benchmarks.engine_job"]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of an engine process started by a test."""
    return engine_env(os.environ, PYTHONPATH=str(REPO), **extra)


@pytest.fixture(scope="session", autouse=True)
def _vllm_rpc_dir() -> Iterator[None]:
    """vLLM binds its ZMQ IPC sockets under ``VLLM_RPC_BASE_PATH`` (``/tmp``) and leaves the
    files behind; every engine and server the suite starts inherits this private directory
    (``meshkv.launch.new_rpc_dir``), removed at the end."""
    if "VLLM_RPC_BASE_PATH" in os.environ:
        yield
        return
    path = new_rpc_dir()
    os.environ["VLLM_RPC_BASE_PATH"] = str(path)
    try:
        yield
    finally:
        os.environ.pop("VLLM_RPC_BASE_PATH", None)
        shutil.rmtree(path, ignore_errors=True)


# --- agents -------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture
def agent_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., AgentProcess]]:
    """Build (not start) agents; every one is killed and cleaned up after the test."""
    made: list[AgentProcess] = []

    def make(**kwargs: Any) -> AgentProcess:
        agent = AgentProcess(**kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.cleanup(kept_logs(request, tmp_path))


@pytest.fixture
def agent(agent_factory: Callable[..., AgentProcess]) -> AgentProcess:
    """One running agent with a 64 MiB CPU tier and no SSD."""
    return agent_factory().start()


@pytest.fixture
def ssd_dir(tmp_path: Path) -> Path:
    path = tmp_path / "ssd"
    path.mkdir()
    return path


@pytest.fixture
def agents(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Agents for engine tests: an SSD directory and a 128 MiB CPU tier unless told."""
    made: list[AgentProcess] = []

    def make(**kwargs: Any) -> AgentProcess:
        kwargs.setdefault("ssd_dir", tmp_path / f"ssd-{len(made)}")
        Path(kwargs["ssd_dir"]).mkdir(exist_ok=True)
        kwargs.setdefault("cpu_bytes", 128 << 20)
        kwargs.setdefault("name", f"vllm-agent-{len(made)}")
        agent = AgentProcess(**kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.cleanup(kept_logs(request, tmp_path))


# --- the model and engines ----------------------------------------------------------------


@pytest.fixture(scope="session")
def prompts() -> Prompts:
    return PROMPTS


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny random Llama (built once, cached by config hash)."""
    cache = default_cache_dir() if os.environ.get("MESHKV_CACHE") else None
    root = cache or tmp_path_factory.mktemp("models")
    return str(build_tiny_llama(cache_dir=root))


def _engine_cmd(workdir: Path) -> list[str]:
    return [sys.executable, *JOB_MODULE, str(workdir / "job.json"), str(workdir / "result.json")]


@pytest.fixture(scope="session")
def warm_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmEngines]:
    """The spare engine-job process (``tests/helpers/warm_engines.py``);
    ``MESHKV_TEST_WARM_ENGINES=0`` starts every job cold."""
    pool = WarmEngines(tmp_path_factory.mktemp("warm-engines"), JOB_MODULE)
    pool.enabled = pool.enabled and os.environ.get("MESHKV_TEST_WARM_ENGINES", "1") != "0"
    _POOLS.append(pool)
    yield pool
    pool.close()


_POOLS: list[WarmEngines] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for pool in _POOLS:
        terminalreporter.write_line(
            f"engine jobs: {pool.handed} run by a spare with vLLM imported, {pool.cold} cold"
            + ("" if pool.enabled else " (spares off)")
        )


@pytest.fixture
def engine(
    tiny_model: str, tmp_path: Path, warm_engines: WarmEngines
) -> Iterator[Callable[..., EngineRun]]:
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
        env = child_env(
            VLLM_ENABLE_V1_MULTIPROCESSING="1" if fields.get("multiprocess") else "0",
            **fields.get("env", {}),
        )
        log_path = workdir / "engine.log"
        argv = [str(workdir / "job.json"), str(workdir / "result.json")]
        proc = warm_engines.popen(argv, env, workdir, log_path)
        run = EngineRun(proc, workdir, log_path)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()


@pytest.fixture(scope="session")
def baseline(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    """Greedy outputs of every prompt from an engine with no connector, always started cold
    (not from the spare): the reference the spare-run engines are compared with."""
    workdir = tmp_path_factory.mktemp("baseline")
    names = ("a", "b", "c", "d", "e")
    job = {
        "model": tiny_model,
        "prompts": [getattr(PROMPTS, n) for n in names],
        "connector": None,
    }
    (workdir / "job.json").write_text(json.dumps(job))
    proc = subprocess.run(
        _engine_cmd(workdir), env=child_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"),
        capture_output=True, timeout=ENGINE_TIMEOUT_S, cwd=str(workdir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout.decode()[-4000:] + proc.stderr.decode()[-4000:]
    result = json.loads((workdir / "result.json").read_text())
    return {n: out["tokens"] for n, out in zip(names, result["outputs"], strict=True)}


@pytest.fixture
def openai_server(tiny_model: str, tmp_path: Path) -> Iterator[Callable[..., HttpProcess]]:
    """Start real vLLM OpenAI servers on the tiny model:
    ``openai_server(agent=None | AgentProcess, role="kv_both", extra_config={}, args=[],
    async_scheduling=False)``;
    every one is stopped after the test."""
    servers: list[HttpProcess] = []

    def start(
        agent: AgentProcess | None = None,
        *,
        role: str = "kv_both",
        extra_config: dict[str, Any] | None = None,
        args: list[str] | None = None,
        prefix_caching: bool = False,
        env: dict[str, str] | None = None,
        async_scheduling: bool = False,
    ) -> HttpProcess:
        port = free_port()
        transfer = None
        if agent is not None:
            transfer = meshkv_kv_transfer_config(agent.socket_path, role, **(extra_config or {}))
        cmd = vllm_server_command(
            sys.executable, tiny_model, port, served_name="tiny",
            kv_transfer_config=transfer, prefix_caching=prefix_caching,
            extra=["--enforce-eager", *(args or [])], async_scheduling=async_scheduling,
        )  # fmt: skip
        server = HttpProcess(
            f"vllm-{len(servers)}",
            cmd,
            f"http://127.0.0.1:{port}",
            env=child_env(**(env or {})),
            log_path=tmp_path / f"vllm-{len(servers)}.log",
        )
        servers.append(server)
        return server.start(ENGINE_TIMEOUT_S)

    yield start
    for server in servers:
        server.stop()
