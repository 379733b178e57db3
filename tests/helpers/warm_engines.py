"""Engine jobs that start with vLLM already imported: the suite's one spare process.

Importing vLLM takes 10-15 s of CPU on this project's 2-core machines, and the suite starts
dozens of engine jobs (``benchmarks.engine_job``). The pool keeps one spare job process that
imports vLLM ahead of time in Linux's idle scheduling class (``SCHED_IDLE``: it runs only on
CPU time nothing else wants, so it does not slow the test that is running), and hands it
the next job whose environment is the one it was started with (but for
``NOT_READ_AT_IMPORT``). Any other job (a different environment, no spare, a spare that
died) starts cold, as before. The job itself runs unchanged in that process
(``engine_job.warm``), which is a plain child of the test process: ``poll``, ``wait`` and
``kill`` work as on any ``Popen``.

Taking a process out of the idle class needs root (``sched_setscheduler`` on another
process, and on one's own threads); without it the pool is off and every job starts cold.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.engine_job import schedule_normally


class WarmEngines:
    def __init__(self, workdir: Path, module: list[str]) -> None:
        self._workdir = workdir
        self._module = module
        self._spare: subprocess.Popen[bytes] | None = None
        self._spare_env: dict[str, str] | None = None
        self._count = 0
        self.enabled = os.geteuid() == 0 and sys.platform == "linux"
        self.handed = 0
        """Jobs run by a spare."""
        self.cold = 0
        """Jobs started cold."""

    def popen(
        self, argv: list[str], env: dict[str, str], cwd: Path, log: Path
    ) -> subprocess.Popen[bytes]:
        """Start the job ``python <module> *argv`` with ``env`` in ``cwd``, output to ``log``."""
        proc = self._take(env)
        if proc is not None and self._hand(proc, argv, cwd, log, env):
            self.handed += 1
        else:
            self.cold += 1
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, *self._module, *argv], stdout=out, stderr=subprocess.STDOUT,
                    env=env, cwd=str(cwd), start_new_session=True,
                )  # fmt: skip
        if self.enabled:
            self._start_spare(env)
        return proc

    def close(self) -> None:
        if self._spare is not None:
            _stop(self._spare)
            self._spare = None

    def _take(self, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        if _key(self._spare_env) != _key(env) or spare.poll() is not None:
            _stop(spare)
            return None
        return spare

    def _hand(
        self, proc: subprocess.Popen[bytes], argv: list[str], cwd: Path, log: Path,
        env: dict[str, str],
    ) -> bool:  # fmt: skip
        # The normal class first, so that an import still under way finishes at full speed;
        # the job then moves the threads it has to the normal class itself.
        try:
            schedule_normally(proc.pid)
            assert proc.stdin is not None
            order = {"argv": argv, "cwd": str(cwd), "log": str(log), "env": env}
            proc.stdin.write(json.dumps(order).encode() + b"\n")
            proc.stdin.close()
        except (OSError, ValueError):
            _stop(proc)
            return False
        return True

    def _start_spare(self, env: dict[str, str]) -> None:
        self._count += 1
        with (self._workdir / f"spare-{self._count}.log").open("wb") as out:
            self._spare = subprocess.Popen(
                [sys.executable, *self._module, "--warm"], stdin=subprocess.PIPE, stdout=out,
                stderr=subprocess.STDOUT, env=env, cwd=str(self._workdir), start_new_session=True,
            )  # fmt: skip
        self._spare_env = dict(env)


NOT_READ_AT_IMPORT = frozenset(
    {"PYTEST_CURRENT_TEST", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND"}
)
"""Variables that may differ between a spare's environment and its job's, because nothing
reads them while vLLM is imported: pytest names the running test in ``PYTEST_CURRENT_TEST``;
vLLM 0.32 reads its two (``vllm.envs``, evaluated on each access until an engine has
started) when it builds an engine. The job gets its own values (``engine_job.warm`` takes
the job's whole environment)."""


def _key(env: dict[str, str] | None) -> dict[str, str] | None:
    if env is None:
        return None
    return {k: v for k, v in env.items() if k not in NOT_READ_AT_IMPORT}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
