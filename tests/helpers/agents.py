"""``AgentProcess``: a real ``meshkv agent`` process on a private socket and a free port.

Used by the agent tests and meant for the mesh and vLLM tests too: start one or several
agents, read where they listen from their ready file, stop them (SIGTERM), kill them
(SIGKILL), freeze them (SIGSTOP/SIGCONT) and restart them on the same SSD directory.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from meshkv.client import AgentClient

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0


class AgentProcess:
    """One agent process. Paths live in a short private directory (socket paths ≤ 107 B)."""

    def __init__(
        self,
        *,
        name: str = "agent",
        cpu_bytes: int = 64 << 20,
        ssd_dir: str | Path | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.cpu_bytes = cpu_bytes
        self.ssd_dir = str(ssd_dir) if ssd_dir is not None else None
        self.args = list(args or [])
        self.env = env
        self.dir = Path(tempfile.mkdtemp(prefix=f"mkv-{name}-", dir="/tmp"))
        self.socket_path = str(self.dir / "agent.sock")
        self.ready_file = self.dir / "ready.json"
        self.log_path = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    # --- lifecycle ----------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "meshkv", "agent",
            "--node-id", self.name,
            "--socket", self.socket_path,
            "--http", "127.0.0.1:0",
            "--ready-file", str(self.ready_file),
            "--cpu-bytes", str(self.cpu_bytes),
            "--log-level", "debug",
        ]  # fmt: skip
        if self.ssd_dir is not None:
            cmd += ["--ssd-dir", self.ssd_dir]
        return cmd + self.args

    def start(self, timeout: float = START_TIMEOUT_S) -> AgentProcess:
        """Start and wait until the ready file names this process."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"agent {self.name} is already running")
        with contextlib.suppress(FileNotFoundError):
            self.ready_file.unlink()
        env = dict(os.environ)
        env.update(self.env or {})
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"agent {self.name} exited with {self.proc.returncode}:\n{self.log()}"
                )
            info = self._read_ready()
            if info is not None and info.get("pid") == self.proc.pid:
                self.info = info
                return self
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"agent {self.name} not ready within {timeout} s:\n{self.log()}")

    def _read_ready(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.ready_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait; returns the exit code."""
        return self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """SIGKILL and wait (a crash: nothing is flushed or removed)."""
        return self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)

    def sigstop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def sigcont(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> AgentProcess:
        self.stop()
        return self.start()

    def _signal_and_wait(self, sig: int, timeout: float) -> int:
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            if sig != signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)  # a frozen agent cannot handle SIGTERM
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                proc.kill()
                proc.wait()
                raise TimeoutError(
                    f"agent {self.name} ignored signal {sig}:\n{self.log()}"
                ) from exc
        code = proc.returncode
        assert code is not None
        return code

    def cleanup(self) -> None:
        """Kill if still running and remove the private directory and a leftover arena."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        if self.proc is not None:
            # Arena names start with meshkv-<pid>-: catch one made before the ready file too.
            for path in glob.glob(f"/dev/shm/meshkv-{self.proc.pid}-*"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    # --- access -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def http(self) -> str:
        """``HOST:PORT`` of the admin API."""
        return str(self.info["http"])

    @property
    def url(self) -> str:
        return f"http://{self.http}"

    @property
    def arena_name(self) -> str:
        return str(self.info["arena_name"])

    def client(self, **kwargs: Any) -> AgentClient:
        return AgentClient(self.socket_path, **kwargs)

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return json.load(response)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
