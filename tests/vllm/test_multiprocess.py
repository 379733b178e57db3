"""The connector in vLLM's default multi-process mode and behind the OpenAI API server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agents import AgentProcess
from tests.vllm.engines import ENGINE_TIMEOUT_S, EngineRun, Prompts

pytestmark = pytest.mark.vllm


def test_multiprocess_engine_hits(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    """Scheduler (engine core) and worker in different processes than the caller."""
    agent = agents().start()
    result = engine(
        [prompts.a, prompts.a],
        connector={"socket_path": agent.socket_path},
        multiprocess=True,
    ).result()
    cold, warm = result["outputs"]
    assert cold["cached_tokens"] == 0
    assert warm["cached_tokens"] == 512
    assert cold["tokens"] == baseline["a"]
    assert warm["tokens"] == baseline["a"]
    with agent.client() as client:
        stats = client.stats()
    assert stats["tiers"]["cpu"]["chunks"] == 2
    assert stats["tiers"]["cpu"]["hit_chunks"] >= 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        data: dict[str, Any] = json.load(response)
        return data


def test_openai_api_server_reports_cached_tokens(
    tiny_model: str,
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    tmp_path: Path,
) -> None:
    from tests.vllm.conftest import ENGINE_ENV

    agent = agents().start()
    port = _free_port()
    transfer = {
        "kv_connector": "MeshKVConnector",
        "kv_connector_module_path": "meshkv.integrations.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"socket": agent.socket_path},
    }
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", tiny_model, "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
        "--max-model-len", "4096", "--no-enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--kv-transfer-config", json.dumps(transfer),
    ]  # fmt: skip
    log_path = tmp_path / "server.log"
    env = dict(os.environ, **ENGINE_ENV)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ENGINE_TIMEOUT_S
        while True:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "server not ready:\n" + log_path.read_text()
            time.sleep(0.5)
        body = {"model": "tiny", "prompt": prompts.a, "max_tokens": 4, "temperature": 0}
        first = _post(base + "/v1/completions", body)
        second = _post(base + "/v1/completions", body)
        details = second["usage"].get("prompt_tokens_details") or {}
        assert (first["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
        assert details.get("cached_tokens") == 512
        assert first["choices"][0]["text"] == second["choices"][0]["text"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
