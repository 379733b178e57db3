"""``meshkv proxy`` in front of a real vLLM OpenAI server started with ``--api-key``: the
client's credentials reach the engine, the engine's refusal reaches the client, and the
engine's helper routes are relayed (``test_proxy.py`` has the same against scripted
engines, P/D legs and the proxy's own key included)."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from meshkv.launch import HttpProcess, free_port, vllm_server_command
from tests.conftest import child_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

KEY = "sk-meshkv-test-1"


def call(url: str, body: dict[str, Any] | None, key: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_a_keyed_engine_behind_the_proxy(tiny_model: str, tmp_path: Path) -> None:
    port = free_port()
    cmd = vllm_server_command(sys.executable, tiny_model, port, served_name="tiny",
                              extra=["--enforce-eager", "--api-key", KEY])  # fmt: skip
    engine = HttpProcess("engine", cmd, f"http://127.0.0.1:{port}", env=child_env(),
                         log_path=tmp_path / "engine.log")  # fmt: skip
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    proxy_port = free_port()
    proxy = HttpProcess(
        "proxy",
        [sys.executable, "-m", "meshkv", "proxy", "--engines", engine.base_url,
         "--listen", f"127.0.0.1:{proxy_port}", "--upstream-api-key-file", str(key_file)],
        f"http://127.0.0.1:{proxy_port}", env=dict(os.environ), log_path=tmp_path / "proxy.log",
    )  # fmt: skip
    with engine, proxy:
        body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 3, "temperature": 0}
        direct = call(engine.base_url + "/v1/completions", body, KEY)
        assert direct[0] == 200
        status, answer = call(proxy.base_url + "/v1/completions", body, KEY)
        assert status == 200 and answer["choices"][0]["text"] == direct[1]["choices"][0]["text"]
        refused = call(engine.base_url + "/v1/completions", body, None)
        assert refused[0] == 401
        assert call(proxy.base_url + "/v1/completions", body, None) == refused
        assert call(proxy.base_url + "/v1/completions", body, "wrong")[0] == 401
        assert call(proxy.base_url + "/v1/models", None, KEY)[1]["data"][0]["id"] == "tiny"
        # vLLM guards only /v1 paths: its tokenizer answers anyone, through the proxy too.
        status, tokens = call(proxy.base_url + "/tokenize", {"model": "tiny", "prompt": "hi"}, None)
        assert (
            status == 200
            and tokens
            == call(engine.base_url + "/tokenize", {"model": "tiny", "prompt": "hi"}, None)[1]
        )
