"""The connector in vLLM's default multi-process mode and behind the OpenAI API server."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from meshkv.launch import AgentProcess, HttpProcess
from tests.vllm.engines import EngineRun, Prompts

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
    assert warm["cached_tokens"] == 640  # two chunks and the cut of the third
    assert cold["tokens"] == baseline["a"]
    assert warm["tokens"] == baseline["a"]
    with agent.client() as client:
        stats = client.stats()
    assert stats["tiers"]["cpu"]["chunks"] == 3
    assert stats["tiers"]["cpu"]["hit_chunks"] >= 2


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        data: dict[str, Any] = json.load(response)
        return data


def test_openai_api_server_reports_cached_tokens(
    openai_server: Callable[..., HttpProcess],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
) -> None:
    agent = agents().start()
    server = openai_server(agent)
    body = {"model": "tiny", "prompt": prompts.a, "max_tokens": 4, "temperature": 0}
    first = _post(server.base_url + "/v1/completions", body)
    second = _post(server.base_url + "/v1/completions", body)
    details = second["usage"].get("prompt_tokens_details") or {}
    assert (first["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
    assert details.get("cached_tokens") == 640
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    # cache_salt (vLLM's per-tenant isolation): a salted request never meets another
    # salt's chunks nor the unsalted ones, and hits its own.
    url = server.base_url + "/v1/completions"
    salted = [
        _post(url, {**body, "cache_salt": salt}) for salt in ("tenant-a", "tenant-b", "tenant-a")
    ]
    assert [_cached(r) for r in salted] == [0, 0, 640]
    assert {r["choices"][0]["text"] for r in salted} == {first["choices"][0]["text"]}
    assert _cached(_post(url, body)) == 640  # the unsalted chunks are still there
    with agent.client() as client:  # three chunks per namespace: none, tenant-a, tenant-b
        assert client.stats()["tiers"]["cpu"]["chunks"] == 9


def _cached(response: dict[str, Any]) -> int:
    details = response["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)
