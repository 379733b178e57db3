"""The admin HTTP API and ``meshkv status`` against a real agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from meshkv.launch import AgentProcess

TOKEN = "s3cret-token-0123456789"


def http(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
            status = response.status
            ctype = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        body, status, ctype = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    return status, (json.loads(body) if "json" in ctype else body.decode())


@pytest.fixture
def token_agent(agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> AgentProcess:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    return agent_factory(args=["--admin-token-file", str(token_file)]).start()


def test_healthz_status_and_metrics(agent: AgentProcess) -> None:
    with agent.client() as c:
        c.put(b"h" * 16, b"x" * 5000, num_tokens=7)
        c.lookup([b"h" * 16, b"m" * 16])
        c.get(b"h" * 16)
    assert http(agent.url + "/healthz") == (200, "ok\n")
    status, doc = http(agent.url + "/v1/status")
    assert status == 200
    assert doc["node_id"] == "agent" and doc["uptime_s"] >= 0 and doc["version"]
    cpu = doc["store"]["tiers"]["cpu"]
    assert cpu["chunks"] == 1 and cpu["capacity_bytes"] == 64 << 20 and cpu["usage_bytes"] > 0
    assert doc["store"]["ssd_degraded"] is False and "leases_open" in doc["store"]
    assert doc["local"]["arena_name"] == agent.arena_name
    status, text = http(agent.url + "/metrics")
    assert status == 200
    metrics = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert metrics["meshkv_lookups_total"] == 1
    assert metrics['meshkv_lookup_hit_chunks_total{tier="cpu"}'] == 1
    assert metrics["meshkv_lookup_miss_chunks_total"] == 1
    assert metrics['meshkv_lookup_hit_tokens_total{tier="cpu"}'] == 0  # no chunk_tokens given
    assert metrics['meshkv_tier_chunks{tier="cpu"}'] == 1
    assert metrics['meshkv_tier_capacity_bytes{tier="cpu"}'] == 64 << 20
    assert metrics['meshkv_stored_bytes_total{tier="cpu"}'] == 5000
    assert metrics['meshkv_local_op_seconds_count{op="lookup"}'] == 1
    assert metrics['meshkv_local_op_seconds_count{op="reserve"}'] == 1
    assert "meshkv_checksum_failures_total" in metrics
    with agent.client(chunk_tokens=256) as c:
        c.lookup([b"h" * 16, b"m" * 16, b"n" * 16])
    _, text = http(agent.url + "/metrics")
    metrics = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert metrics['meshkv_lookup_hit_tokens_total{tier="cpu"}'] == 256
    assert metrics["meshkv_lookup_miss_tokens_total"] == 512
    # A probe (a partial chunk cut at each block) answers like a lookup, counted nowhere.
    with agent.client(chunk_tokens=256) as c:
        reply = c.lookup([b"m" * 16, b"h" * 16], probe=True)
    assert (reply.prefix, reply.tiers) == (0, [None, "cpu"])
    _, text = http(agent.url + "/metrics")
    after = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    for name in ("meshkv_lookups_total", "meshkv_lookup_miss_chunks_total",
                 'meshkv_lookup_hit_chunks_total{tier="cpu"}',
                 'meshkv_lookup_hit_tokens_total{tier="cpu"}',
                 "meshkv_lookup_miss_tokens_total"):  # fmt: skip
        assert after[name] == metrics[name], name


def test_chunk_endpoint(agent: AgentProcess) -> None:
    key = bytes(range(16))
    with agent.client() as c:
        c.put(key, b"y" * 3000, num_tokens=16)
    status, doc = http(f"{agent.url}/v1/chunks/{key.hex()}")
    assert status == 200
    assert doc["tiers"] == ["cpu"] and doc["size"] == 3000 and doc["num_tokens"] == 16
    status, doc = http(f"{agent.url}/v1/chunks/{'ab' * 16}")
    assert status == 404 and "not stored" in doc["error"]
    for bad in ("xyz", "ab" * 15, "ab" * 17, "zz" * 16):
        status, doc = http(f"{agent.url}/v1/chunks/{bad}")
        assert status == 400 and "malformed key" in doc["error"] and "32 hex digits" in doc["error"]


def test_clear_needs_configured_token(agent: AgentProcess) -> None:
    status, doc = http(agent.url + "/v1/clear", "POST", token="anything")
    assert status == 403 and "--admin-token-file" in doc["error"]


def test_clear_with_and_without_token(token_agent: AgentProcess) -> None:
    with token_agent.client() as c:
        for i in range(3):
            c.put(b"%016d" % i, b"z" * 100)
        status, doc = http(token_agent.url + "/v1/clear", "POST")
        assert status == 401 and "Bearer" in doc["error"]
        status, doc = http(token_agent.url + "/v1/clear", "POST", token="wrong-token")
        assert status == 403 and "wrong" in doc["error"]
        assert c.lookup([b"%016d" % i for i in range(3)]).prefix == 3
        status, doc = http(token_agent.url + "/v1/clear", "POST", token=TOKEN)
        assert status == 200 and doc == {"cleared": 3}
        assert c.lookup([b"%016d" % i for i in range(3)]).prefix == 0


def test_status_cli(agent: AgentProcess) -> None:
    run = [sys.executable, "-m", "meshkv", "status", "--http", agent.http]
    out = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["node_id"] == "agent" and "cpu" in doc["store"]["tiers"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "agent" in out.stdout and "cpu" in out.stdout and "capacity_bytes" in out.stdout


def test_status_cli_unreachable() -> None:
    for cmd in (["status", "--timeout", "1"], ["ring", "status"]):
        run = [sys.executable, "-m", "meshkv", *cmd, "--http", "127.0.0.1:1"]
        out = subprocess.run(run, capture_output=True, text=True, timeout=30)
        assert out.returncode == 1
        assert f"meshkv {cmd[0]}: error: no agent answering at http://127.0.0.1:1" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--http", "http://10.0.0.5:7471/"],
         "--http takes HOST:PORT, not a URL: got 'http://10.0.0.5:7471/' "
         "(did you mean --http 10.0.0.5:7471?)"),
        (["--http", "127.0.0.1:abc"], "--http: port 'abc' is not a number"),
        (["--http", "127.0.0.1:7471", "--timeout", "0"],
         "argument --timeout: must be a positive number of seconds, got 0"),
    ],
)  # fmt: skip
def test_status_and_ring_refuse_a_bad_address_by_flag(args: list[str], message: str) -> None:
    commands = [["status"]] + ([["ring", "status"]] if "--timeout" not in args else [])
    for cmd in commands:
        run = [sys.executable, "-m", "meshkv", *cmd, *args]
        out = subprocess.run(run, capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, out.stderr
        assert f"meshkv {cmd[0]}" in out.stderr and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_an_admin_port_in_use_is_a_clear_error(agent: AgentProcess, tmp_path: Path) -> None:
    """A second agent given the first one's --http port: exit 1 and one line that names
    the address and what to do, no traceback, nothing left in /dev/shm."""
    shm_before = set(os.listdir("/dev/shm"))
    run = [
        sys.executable, "-m", "meshkv", "agent", "--cpu-bytes", str(64 << 20),
        "--socket", str(tmp_path / "second.sock"), "--http", agent.http,
    ]  # fmt: skip
    out = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert f"meshkv agent: error: cannot serve the admin HTTP on {agent.http}:" in out.stderr
    assert "address already in use" in out.stderr and "pass a free --http" in out.stderr
    assert "Traceback" not in out.stderr
    assert set(os.listdir("/dev/shm")) <= shm_before  # the second agent's arena is gone
    assert agent.running and agent.get_json("/v1/status")["node_id"] == "agent"


class _NotAnAgent(BaseHTTPRequestHandler):
    """Some other HTTP server (a vLLM engine, a proxy): HTML on /v1/status, 404 elsewhere."""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path == "/v1/status":
            body = b"<html>not meshkv</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *args: Any) -> None:
        pass


def test_status_and_ring_say_when_the_address_is_not_an_agent() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotAnAgent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        for cmd in (["status"], ["ring", "status"]):
            out = subprocess.run(
                [sys.executable, "-m", "meshkv", *cmd, "--http", address],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert out.returncode == 1, out.stderr
            assert f"{address} is not a meshkv agent's admin address" in out.stderr, out.stderr
            assert "pass the agent's --http" in out.stderr and "Traceback" not in out.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_status_and_ring_ask_the_local_agent_by_default() -> None:
    """Without ``--http``, ``meshkv status`` and ``meshkv ring status|owners`` ask the agent
    at its own default admin address (ring used to demand the flag)."""
    for cmd in (["status"], ["ring", "status"], ["ring", "owners", "00" * 16]):
        out = subprocess.run(
            [sys.executable, "-m", "meshkv", *cmd], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 1, out.stderr  # nothing answers there in the suite
        assert "127.0.0.1:7471" in out.stderr and "Traceback" not in out.stderr, out.stderr
