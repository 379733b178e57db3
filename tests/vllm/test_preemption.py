"""A request vLLM preempts keeps its hits: its blocks are freed, but its prompt's chunks
are still in the agent, so when it is scheduled again the connector looks it up and loads
it again instead of computing it (at most ``MAX_RELOADS`` times; a load that failed is
computed). A real OpenAI server with a KV cache too small for four concurrent requests.

(Outputs: on this setup the reloaded and the recomputed request gave the same 300 greedy
tokens, checked by hand against the code before the change; the preempted request's output
may differ from the same prompt run alone, with or without a connector, because vLLM
recomputes it inside another batch.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from meshkv.launch import AgentProcess, HttpProcess, http_get, prometheus_sum
from tests.vllm.engines import _tokens
from tests.vllm.pd import post

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [_tokens(700) for _ in range(4)]
"""Each: two whole 256-token chunks and a 128-token cut of the third (``block_hits``)."""
READS_PER_LOAD = 3


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    return post(url, body, timeout=240)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async-scheduling"])
def test_a_preempted_request_is_loaded_again_not_computed(
    openai_server: Callable[..., HttpProcess],
    agents: Callable[..., AgentProcess],
    async_scheduling: bool,
) -> None:
    """Also under vLLM's async scheduling, where the reload runs off the step."""
    agent = agents().start()
    # ~3,900 tokens of KV: four requests of 700 + 380 tokens cannot all stay.
    server = openai_server(
        agent,
        args=["--kv-cache-memory-bytes", str(2 << 20), "--max-model-len", "1100"],
        async_scheduling=async_scheduling,
    )
    url = server.base_url + "/v1/completions"
    for prompt in PROMPTS:  # computed and saved, one at a time
        _post(url, {"model": "tiny", "prompt": prompt, "max_tokens": 1})
    reads = agent.metric("meshkv_hit_chunks_total", 'tier="cpu"')
    before = http_get(server.base_url + "/metrics").decode()
    # One request with all four prompts: vLLM admits them in one go. Four client threads
    # arrived staggered on a busy CI machine, the first finished before the last was
    # admitted, and nothing was preempted (fresh-clone run BL).
    body = {"model": "tiny", "prompt": PROMPTS, "max_tokens": 380, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    answer = _post(url, body)
    time.sleep(0.5)  # vLLM updates its counters after the step
    after = http_get(server.base_url + "/metrics").decode()
    preempted = prometheus_sum(after, "vllm:num_preemptions_total") - prometheus_sum(
        before, "vllm:num_preemptions_total"
    )
    assert len(answer["choices"]) == len(PROMPTS)
    assert answer["usage"]["completion_tokens"] == 380 * len(PROMPTS)
    assert preempted >= 1, "the setup no longer makes vLLM preempt; shrink the KV cache"
    loads = agent.metric("meshkv_hit_chunks_total", 'tier="cpu"') - reads
    # Every request loaded its three chunks once; each preempted one loaded them again
    # (before: it computed its whole prompt again).
    assert loads >= READS_PER_LOAD * (len(PROMPTS) + 1), (loads, preempted)

    # The connector's own counters are on the server's /metrics (``vllm:meshkv_*``), the
    # scheduler side's (reloads) beside the worker's (loaded chunks).
    def grew(name: str) -> float:
        return prometheus_sum(after, name) - prometheus_sum(before, name)

    assert grew("vllm:meshkv_reloads_total") >= 1
    assert grew("vllm:meshkv_loaded_chunks_total") >= READS_PER_LOAD * (len(PROMPTS) + 1)
    assert grew("vllm:meshkv_load_errors_total") == 0
    if async_scheduling:  # every load (the reloads too) ran off the step
        assert grew("vllm:meshkv_async_loads_total") >= len(PROMPTS) + 1
