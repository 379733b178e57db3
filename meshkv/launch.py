"""Start meshkv's and vLLM's processes and wait until they serve: the one harness.

``meshkv bench``, the tests, the source-tree benchmarks and the demo all start their
processes through this module:

* ``AgentProcess`` — one ``meshkv agent`` on a private socket and a free HTTP port; start
  (wait for its ready file), stop (SIGTERM), kill (SIGKILL), freeze (SIGSTOP/SIGCONT),
  restart on the same SSD directory, clean up (including an arena a crash left behind).
* ``HttpProcess`` — any HTTP server process that is ready when a URL answers 200: a vLLM
  OpenAI server (``vllm_server_command``) or ``meshkv proxy``. Each gets a private
  directory for vLLM's ZMQ IPC sockets (``VLLM_RPC_BASE_PATH``), removed when it stops:
  vLLM leaves its seven socket files behind even after a clean SIGTERM, and in ``/tmp``
  they piled up by the thousand (about 250 per test-suite run).
* ``engine_env`` — the environment every vLLM engine process gets: offline hubs, no usage
  reports, and one CPU thread binding for all engines (vLLM's default ``auto`` binds an
  engine with a KV connector to more cores than one without, which makes comparisons unfair
  and changes float reduction order).
* ``free_port``, ``kill_group``, ``new_rpc_dir``, ``prometheus_sum``.

Every process runs in its own session (a Ctrl-C in a terminal reaches only its parent, which
then stops the children in order), and every wait has a deadline; a failure raises
``LaunchError`` with the command and the tail of the process's log.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from meshkv.chunk import Namespace
from meshkv.client import AgentClient
from meshkv.transport.base import format_address, parse_address

AGENT_START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
SERVER_START_TIMEOUT_S = 300.0
LOG_TAIL_CHARS = 4000


class LaunchError(RuntimeError):
    """A process did not start, answer or stop as it should; the message has its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for programs that take numbers, not 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def cpu_list() -> str:
    """This process's CPUs in vLLM's bind syntax (``0-1`` or ``0,2,3``)."""
    cpus = sorted(os.sched_getaffinity(0))
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


def engine_env(environ: Mapping[str, str], **extra: str) -> dict[str, str]:
    """The environment of a vLLM engine process: ``environ`` plus the settings every engine
    started here shares (the same thread binding for every arm of a comparison)."""
    env = dict(environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_CPU_OMP_THREADS_BIND": environ.get("VLLM_CPU_OMP_THREADS_BIND") or cpu_list(),
            "UCX_WARN_UNUSED_ENV_VARS": "n",
        }
    )
    env.update(extra)
    return env


def new_rpc_dir() -> Path:
    """A private directory for vLLM's ZMQ IPC sockets (``VLLM_RPC_BASE_PATH``), which vLLM
    leaves behind; short and under /tmp, since a socket path (this, '/', a 36-character
    uuid) must fit the 107 bytes of a Unix socket address. The caller removes it."""
    return Path(tempfile.mkdtemp(prefix="mkv-rpc-", dir="/tmp"))


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal ``proc``'s whole process group (vLLM's engine-core and worker children too)
    and wait for it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_TIMEOUT_S)


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


def prometheus_sum(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of metric ``name`` in a Prometheus text page whose label set
    contains ``labels`` (e.g. ``'tier="cpu"'``); 0.0 when there are none."""
    total = 0.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, label_part = head.partition("{")
        if metric_name == name and (not labels or labels in label_part):
            total += float(value)
    return total


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data: bytes = response.read()
        return data


def http_post_json(url: str, body: Mapping[str, Any], timeout: float = 300.0) -> Any:
    """POST ``body`` as JSON and return the decoded JSON answer."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


class AgentProcess:
    """One ``meshkv agent`` process. Its files live in a short private directory (Unix
    socket paths are limited to 107 bytes)."""

    def __init__(
        self,
        *,
        name: str = "agent",
        cpu_bytes: int = 64 << 20,
        ssd_dir: str | os.PathLike[str] | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_level: str = "debug",
        python: str = sys.executable,
        node_id: str | None = None,
        default_id: bool = False,
    ) -> None:
        self.name = name
        self.node_id = node_id or name
        """The ``--node-id`` passed (``name`` unless given); with ``default_id`` none is
        passed and the agent picks its own."""
        self.default_id = default_id
        self.cpu_bytes = cpu_bytes
        self.ssd_dir = None if ssd_dir is None else str(ssd_dir)
        self.args = list(args)
        self.env = dict(env) if env is not None else None
        self.log_level = log_level
        self.python = python
        self.dir = Path(tempfile.mkdtemp(prefix=f"mkv-{name}-", dir="/tmp"))
        self.socket_path = str(self.dir / "agent.sock")
        self.ready_file = self.dir / "ready.json"
        self.log_path = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    # --- lifecycle ----------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [
            self.python, "-m", "meshkv", "agent",
            "--socket", self.socket_path,
            "--http", "127.0.0.1:0",
            "--ready-file", str(self.ready_file),
            "--cpu-bytes", str(self.cpu_bytes),
            "--log-level", self.log_level,
        ]  # fmt: skip
        if not self.default_id:
            cmd += ["--node-id", self.node_id]
        if self.ssd_dir is not None:
            cmd += ["--ssd-dir", self.ssd_dir]
        return cmd + self.args

    def start(self, timeout: float = AGENT_START_TIMEOUT_S) -> AgentProcess:
        """Start and wait until the ready file names this process."""
        if self.proc is not None and self.proc.poll() is None:
            raise LaunchError(f"agent {self.name} is already running")
        with contextlib.suppress(FileNotFoundError):
            self.ready_file.unlink()
        env = dict(os.environ if self.env is None else self.env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LaunchError(
                    f"agent {self.name} exited with {self.proc.returncode}:\n{self.log()}"
                )
            info = self._read_ready()
            if info is not None and info.get("pid") == self.proc.pid:
                self.info = info
                return self
            time.sleep(0.02)
        self.kill()
        raise LaunchError(f"agent {self.name} not ready within {timeout} s:\n{self.log()}")

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
                raise LaunchError(f"agent {self.name} ignored signal {sig}:\n{self.log()}") from exc
        code = proc.returncode
        assert code is not None
        return code

    def cleanup(self, keep_log_in: Path | None = None) -> None:
        """Kill if still running, remove the private directory and a leftover arena.

        ``keep_log_in``: a directory to copy the agent's log into first (as
        ``<name>.log``), so that a failed test leaves it behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        if keep_log_in is not None and self.log_path.exists():
            keep_log_in.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(self.log_path, keep_log_in / f"{self.name}.log")
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

    def client(self, namespace: Namespace | None = None, **kwargs: Any) -> AgentClient:
        return AgentClient(self.socket_path, namespace=namespace, **kwargs)

    def get_json(self, path: str) -> Any:
        return json.loads(http_get(self.url + path))

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a sample on the agent's ``/metrics`` (0.0 when absent)."""
        return prometheus_sum(http_get(self.url + "/metrics").decode(), name, labels)

    def log(self) -> str:
        return log_tail(self.log_path, 1 << 20)


def write_secret(directory: Path, name: str = "mesh.secret") -> Path:
    """A fresh mesh secret file (mode 0600) in ``directory``."""
    path = directory / name
    path.write_text(os.urandom(24).hex() + "\n")
    path.chmod(0o600)
    return path


def listen_args(listen: str, transport: str = "tcp") -> list[str]:
    """``--listen`` (and ``--advertise``) for a peer port at ``listen`` (``HOST:PORT``).
    A UCX listener accepts on every interface and the agent refuses a UCX ``--listen``
    with one host: for UCX the port is fixed here, the listener takes the wildcard and
    ``HOST:PORT`` is advertised."""
    if transport != "ucx":
        return ["--listen", listen]
    host, port = parse_address(listen)
    if port == 0:
        port = free_port(host)
    return ["--listen", f"0.0.0.0:{port}", "--advertise", format_address(host, port)]


def mesh_args(
    secret: Path,
    *,
    join: list[str] | None = None,
    listen: str = "127.0.0.1:0",
    preset: str = "local",
    replicas: int = 1,
    transport: str = "tcp",
) -> list[str]:
    """``meshkv agent`` flags that make it a mesh member (``join``: seed addresses)."""
    args = [
        *listen_args(listen, transport),
        "--mesh-secret-file", str(secret),
        "--mesh-preset", preset,
        "--replicas", str(replicas),
        "--transport", transport,
    ]  # fmt: skip
    if join:
        args += ["--join", ",".join(join)]
    return args


def vllm_server_command(
    python: str,
    model: str,
    port: int,
    *,
    served_name: str = "model",
    kv_transfer_config: Mapping[str, Any] | None = None,
    prefix_caching: bool = False,
    kv_cache_memory_bytes: int = 64 << 20,
    max_model_len: int = 4096,
    extra: Sequence[str] = (),
    async_scheduling: bool = False,
) -> list[str]:
    """``python -m vllm.entrypoints.openai.api_server`` for ``model`` on loopback (the
    ``vllm`` console script does not start under the vllm-cpu distribution).
    ``async_scheduling``: run vLLM's asynchronous scheduler, which vllm-cpu switches off
    (through ``meshkv.bench.vllm_async``; ``python`` must import meshkv)."""
    module = "meshkv.bench.vllm_async" if async_scheduling else "vllm.entrypoints.openai.api_server"
    cmd = [
        python, "-m", module,
        "--model", model, "--served-model-name", served_name,
        "--host", "127.0.0.1", "--port", str(port),
        "--kv-cache-memory-bytes", str(kv_cache_memory_bytes),
        "--max-model-len", str(max_model_len),
        "--enable-prompt-tokens-details",
        "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
    ]  # fmt: skip
    if kv_transfer_config is not None:
        cmd += ["--kv-transfer-config", json.dumps(dict(kv_transfer_config))]
    if async_scheduling:
        cmd.append("--async-scheduling")
    return cmd + list(extra)


def meshkv_kv_transfer_config(
    socket_path: str, role: str = "kv_both", **extra: Any
) -> dict[str, Any]:
    """The ``kv_transfer_config`` of an engine using the meshkv connector."""
    return {
        "kv_connector": "MeshKVConnector",
        "kv_connector_module_path": "meshkv.integrations.vllm",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"socket": socket_path, **extra},
    }


class HttpProcess:
    """A server process at ``base_url`` that is ready once ``base_url + health`` answers
    200 (vLLM's OpenAI server and ``meshkv proxy`` both serve ``/health``)."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        base_url: str,
        *,
        health: str = "/health",
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.base_url = base_url.rstrip("/")
        self.ready_url = self.base_url + health
        self.env = dict(env) if env is not None else dict(os.environ)
        self.cwd = cwd
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="mkv-srv-")) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.rpc_dir: Path | None = None
        """This process's ``VLLM_RPC_BASE_PATH`` while it runs (None when the caller's
        environment names one: that directory is the caller's to clean)."""

    def start(self, timeout: float = SERVER_START_TIMEOUT_S) -> HttpProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = self.env
        self._remove_rpc_dir()  # a previous run's, if it ended without a stop()
        if "VLLM_RPC_BASE_PATH" not in env:
            self.rpc_dir = new_rpc_dir()
            env = {**env, "VLLM_RPC_BASE_PATH": str(self.rpc_dir)}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
            )
        self.wait_ready(timeout)
        return self

    def _remove_rpc_dir(self) -> None:
        if self.rpc_dir is not None and (self.proc is None or self.proc.poll() is not None):
            shutil.rmtree(self.rpc_dir, ignore_errors=True)
            self.rpc_dir = None

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT_S) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LaunchError(
                    f"{self.name} exited with {self.proc.returncode}: {' '.join(self.command)}"
                    f"\n{self.log()}"
                )
            try:
                with urllib.request.urlopen(self.ready_url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise LaunchError(f"{self.name} not ready within {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.25)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the server and its children (SIGTERM, then SIGKILL after a grace period)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                kill_group(proc)
        else:
            kill_group(proc)  # the leader is gone; its children must not linger
        self._remove_rpc_dir()
        return proc.returncode

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self._remove_rpc_dir()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return log_tail(self.log_path)

    def __enter__(self) -> HttpProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def computed_prompt_tokens(server: HttpProcess) -> float:
    """Prompt tokens a vLLM server computed itself so far (its own counter: not those from
    its prefix cache or a KV connector)."""
    page = http_get(server.base_url + "/metrics").decode()
    return prometheus_sum(page, "vllm:prompt_tokens_by_source_total", 'source="local_compute"')


class RedisProcess:
    """A throw-away ``redis-server`` (Debian package) on loopback: no persistence, its files
    in a private directory. ``tls_dir`` (with ``ca.crt``, ``server.crt``, ``server.key``, as
    ``make_test_ca`` writes them) serves TLS only; ``password`` requires it."""

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        tls_dir: Path | None = None,
        maxmemory: int | None = None,
    ) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise LaunchError("redis-server not found (apt-get install -y redis-server)")
        self.port = port or free_port()
        self.password = password
        self.tls_dir = tls_dir
        self.dir = Path(tempfile.mkdtemp(prefix="mkv-redis-", dir="/tmp"))
        self.log_path = self.dir / "redis.log"
        cmd = [server, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.dir), "--logfile", str(self.log_path)]  # fmt: skip
        if tls_dir is None:
            cmd += ["--port", str(self.port)]
        else:
            cmd += ["--port", "0", "--tls-port", str(self.port),
                    "--tls-cert-file", str(tls_dir / "server.crt"),
                    "--tls-key-file", str(tls_dir / "server.key"),
                    "--tls-ca-cert-file", str(tls_dir / "ca.crt"),
                    "--tls-auth-clients", "no"]  # fmt: skip
        if password is not None:
            cmd += ["--requirepass", password]
        if maxmemory is not None:
            cmd += ["--maxmemory", str(maxmemory), "--maxmemory-policy", "allkeys-lru"]
        self.command = cmd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls_dir else 'redis'}://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        """A redis-py client of this server (synchronous)."""
        import redis

        kwargs: dict[str, Any] = {}
        if self.tls_dir is not None:
            kwargs = {"ssl": True, "ssl_ca_certs": str(self.tls_dir / "ca.crt")}
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=10, **kwargs
        )

    def start(self, timeout: float = 10.0) -> RedisProcess:
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        client = self.client()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise LaunchError(f"redis-server exited with {self.proc.returncode}:\n"
                                      f"{log_tail(self.log_path)}")  # fmt: skip
                try:
                    client.ping()
                    return self
                except Exception:
                    if time.monotonic() > deadline:
                        raise LaunchError(
                            f"redis-server not ready in {timeout} s:\n{log_tail(self.log_path)}"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def sigstop(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def sigcont(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            kill_group(self.proc)
            self.proc.wait(10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


def make_test_ca(directory: Path, host: str = "127.0.0.1") -> Path:
    """A private CA and a server certificate for ``host`` (``openssl``; tests and demos
    only): ``ca.crt``, ``server.crt``, ``server.key`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=meshkv-test-ca")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", f"/CN={host}")  # fmt: skip
    (directory / "ext.cnf").write_text(f"subjectAltName=IP:{host},DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return directory
