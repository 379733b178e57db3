"""The suite's spare engine-job process (``tests/helpers/warm_engines.py``), with a stand-in
job module that reports how it ran instead of importing vLLM (real processes, real pipes)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.helpers.warm_engines import WarmEngines

# Started as ``python -c JOB --warm`` (a spare) or ``python -c JOB OUT`` (cold); writes
# how it ran to its log (fd 1, which a spare gets from the order).
JOB = r"""
import json, os, sys
mode = "cold"
if sys.argv[1:] == ["--warm"]:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    line = sys.stdin.readline()
    if not line:
        sys.exit(0)
    order = json.loads(line)
    os.environ.clear()
    os.environ.update(order["env"])
    log = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.chdir(order["cwd"])
    mode, sys.argv = "warm", [sys.argv[0], *order["argv"]]
report = {"mode": mode, "argv": sys.argv[1:], "pid": os.getpid(), "cwd": os.getcwd(),
          "test": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
          "policy": os.sched_getscheduler(0)}
print(json.dumps(report), flush=True)
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="spares need root (the pool is off)")


def _run(pool: WarmEngines, tmp_path: Path, name: str, env: dict[str, str]) -> dict[str, object]:
    cwd = tmp_path / name
    cwd.mkdir()
    log = cwd / "job.log"
    proc = pool.popen([name], env, cwd, log)
    assert proc.wait(10) == 0
    report: dict[str, object] = json.loads(log.read_text())
    assert report["argv"] == [name] and report["cwd"] == str(cwd)
    return report


def _wait_idle(pool: WarmEngines) -> None:
    """Until the spare has put itself in the idle class (as the real one does first)."""
    spare = pool._spare
    assert spare is not None
    deadline = time.monotonic() + 10
    while os.sched_getscheduler(spare.pid) != os.SCHED_IDLE:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_job_with_the_spare_s_environment_runs_in_the_spare_at_normal_priority(
    tmp_path: Path,
) -> None:
    pool = WarmEngines(tmp_path, ["-c", JOB])
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1", "PYTEST_CURRENT_TEST": "a"}
    try:
        first = _run(pool, tmp_path, "one", env)
        assert first["mode"] == "cold" and pool.cold == 1
        _wait_idle(pool)
        spare_pid = pool._spare.pid if pool._spare else None
        # variables nothing reads at import differ: still the spare's job, with its own values
        changed = {"VLLM_CPU_OMP_THREADS_BIND": "0|0", "PYTEST_CURRENT_TEST": "b"}
        second = _run(pool, tmp_path, "two", {**env, **changed})
        assert second["mode"] == "warm" and second["pid"] == spare_pid
        assert second["test"] == "0|0"
        assert second["policy"] == os.SCHED_OTHER  # taken out of the idle class
        assert pool.handed == 1
    finally:
        pool.close()


def test_a_job_with_another_environment_starts_cold_and_the_spare_is_replaced(
    tmp_path: Path,
) -> None:
    pool = WarmEngines(tmp_path, ["-c", JOB])
    env = dict(os.environ)
    try:
        _run(pool, tmp_path, "one", env)
        old = pool._spare
        assert old is not None
        other = _run(pool, tmp_path, "two", {**env, "OMP_NUM_THREADS": "7"})
        assert other["mode"] == "cold" and pool.handed == 0
        assert old.poll() is not None  # the mismatched spare was stopped, not left running
        again = _run(pool, tmp_path, "three", {**env, "OMP_NUM_THREADS": "7"})
        assert again["mode"] == "warm"
    finally:
        pool.close()
    assert pool._spare is None


def test_a_dead_spare_is_never_handed_a_job(tmp_path: Path) -> None:
    pool = WarmEngines(tmp_path, ["-c", JOB])
    env = dict(os.environ)
    try:
        _run(pool, tmp_path, "one", env)
        assert pool._spare is not None
        pool._spare.kill()
        pool._spare.wait()
        assert _run(pool, tmp_path, "two", env)["mode"] == "cold"
    finally:
        pool.close()


def test_spares_off_starts_every_job_cold(tmp_path: Path) -> None:
    pool = WarmEngines(tmp_path, ["-c", JOB])
    pool.enabled = False
    env = dict(os.environ)
    assert [_run(pool, tmp_path, n, env)["mode"] for n in ("one", "two")] == ["cold", "cold"]
    assert pool._spare is None and pool.cold == 2
