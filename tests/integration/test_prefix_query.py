"""Prefix queries (``POST /v1/prefix``) on real agents, and the proxy's ``cache_aware`` routing
that asks them.

The agents are real processes; engines are declared to them the way the connector does it
(hello with a namespace and ``chunk_tokens``, chunks stored under the keys the connector
computes). The engines behind the proxy are the scripted OpenAI servers of
``test_proxy.py``: routing depends on what the agents answer, not on what an engine computes
(real engines behind cache-aware routing run in ``meshkv bench serve --routing``).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from meshkv.chunk import Namespace, chunk_keys
from meshkv.client import AgentClient
from meshkv.errors import ConfigError
from meshkv.launch import AgentProcess
from meshkv.proxy.config import ProxyConfig
from tests.helpers.proxy import FakeEngine, post, proxy, run

CHUNK = 16
NS = Namespace(model="tiny", num_layers=2, kv_heads=2, head_size=8, block_size=16)


def prefix(agent: AgentProcess, body: Any) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    request = urllib.request.Request(
        agent.url + "/v1/prefix", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def store_prefix(client: AgentClient, ns: Namespace, tokens: list[int]) -> int:
    """Store every full chunk of ``tokens`` as the connector would; returns the count."""
    keys = chunk_keys(ns.digest(), tokens, CHUNK)
    for key in keys:
        client.put(key, bytes(64), num_tokens=CHUNK)
    return len(keys)


@pytest.fixture
def agent() -> Iterator[AgentProcess]:
    with AgentProcess(name="prefix-q", log_level="warning") as a:
        yield a


def test_prefix_query_counts_the_leading_tokens_held(agent: AgentProcess) -> None:
    prompt = list(range(100, 100 + 5 * CHUNK + 7))  # 5 full chunks and a tail
    # Before any engine said hello with its chunk size, nothing can be answered.
    status, answer = prefix(agent, {"token_ids": prompt})
    assert status == 200 and answer["tokens"] == 0 and answer["engines"] == 0
    with AgentClient(agent.socket_path, namespace=NS, chunk_tokens=CHUNK) as client:
        assert store_prefix(client, NS, prompt[: 3 * CHUNK]) == 3
        lookups = agent.metric("meshkv_lookups_total")
        status, answer = prefix(agent, {"token_ids": prompt})
        assert status == 200, answer
        assert answer == {
            "node": agent.node_id,
            "tokens": 3 * CHUNK,
            "chunk_tokens": CHUNK,
            "tiers": {"cpu": 3 * CHUNK, "ssd": 0},
            "engines": 1,
        }
        # A prompt that differs in its second chunk shares only the first.
        other = prompt[:CHUNK] + [7] * CHUNK + prompt[2 * CHUNK :]
        assert prefix(agent, {"token_ids": other})[1]["tokens"] == CHUNK
        # Another model's engine (none registered) holds nothing; the query is read-only.
        assert prefix(agent, {"token_ids": prompt, "model": "other"})[1]["tokens"] == 0
        assert agent.metric("meshkv_lookups_total") == lookups


def test_prefix_query_needs_every_tensor_parallel_rank(agent: AgentProcess) -> None:
    ranks = [replace(NS, tp_size=2, tp_rank=r) for r in range(2)]
    prompt = list(range(4 * CHUNK))
    with (
        AgentClient(agent.socket_path, namespace=ranks[0], chunk_tokens=CHUNK) as c0,
        AgentClient(agent.socket_path, namespace=ranks[1], chunk_tokens=CHUNK) as c1,
    ):
        store_prefix(c0, ranks[0], prompt)  # rank 0 has all four chunks
        store_prefix(c1, ranks[1], prompt[: 2 * CHUNK])  # rank 1 only two
        assert prefix(agent, {"token_ids": prompt})[1]["tokens"] == 2 * CHUNK


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "must be JSON"),
        ({"tokens": [1, 2]}, "'token_ids' must be a list"),
        ({"token_ids": [1, "two"]}, "integers in [0, 2**32)"),
        ({"token_ids": [-1]}, "integers in [0, 2**32)"),
        ({"token_ids": [1], "model": 3}, "'model' must be a string"),
        ([1, 2, 3], "expected a JSON object"),
    ],
)
def test_bad_prefix_queries_get_a_clear_error(agent: AgentProcess, body: Any, message: str) -> None:
    status, answer = prefix(agent, body)
    assert status == 400 and message in answer["error"]
    assert prefix(agent, {"token_ids": [1, 2, 3]})[0] == 200  # still serving


# --- cache-aware routing -----------------------------------------------------------------


def test_cache_aware_routing_sends_a_prompt_where_its_prefix_is() -> None:
    with (
        AgentProcess(name="route-a", log_level="warning") as agent_a,
        AgentProcess(name="route-b", log_level="warning") as agent_b,
        AgentClient(agent_b.socket_path, namespace=NS, chunk_tokens=CHUNK) as client_b,
        AgentClient(agent_a.socket_path, namespace=NS, chunk_tokens=CHUNK) as client_a,
    ):
        doc_b = list(range(1000, 1000 + 8 * CHUNK))
        doc_a = list(range(5000, 5000 + 8 * CHUNK))
        store_prefix(client_b, NS, doc_b)
        store_prefix(client_a, NS, doc_a[: 6 * CHUNK])

        async def main() -> None:
            a, b = await FakeEngine("a").start(), await FakeEngine("b").start()
            try:
                async with proxy(
                    engines=(a.url, b.url),
                    agents=(agent_a.url, agent_b.url),
                    routing="cache_aware",
                ) as url:
                    for doc, engine in ((doc_b, "b"), (doc_a, "a"), (doc_b, "b")):
                        status, out = await post(
                            url + "/v1/completions", {"prompt": doc + [1, 2, 3]}
                        )
                        assert status == 200, out
                        assert out["choices"][0]["text"] == f"{engine}-answer"
                    status, metrics = await _get(url + "/metrics")
                    assert 'meshkv_proxy_route_choices_total{reason="cache"} 3.0' in metrics
                    held = 8 * CHUNK + 6 * CHUNK + 8 * CHUNK
                    assert f"meshkv_proxy_routed_prefix_tokens_total {held:.1f}" in metrics
                    # vLLM computes a prompt-logprobs request whole wherever it runs: what
                    # b holds is no reason to send it there (round robin among the least
                    # loaded), and no prefix is asked for.
                    answers = set()
                    for _ in range(2):
                        body = {"prompt": doc_b + [1, 2, 3], "prompt_logprobs": 1}
                        status, out = await post(url + "/v1/completions", body)
                        assert status == 200, out
                        answers.add(out["choices"][0]["text"])
                    assert answers == {"a-answer", "b-answer"}
                    status, metrics = await _get(url + "/metrics")
                    assert 'meshkv_proxy_route_choices_total{reason="no_cache"} 2.0' in metrics
                    assert f"meshkv_proxy_routed_prefix_tokens_total {held:.1f}" in metrics
            finally:
                await a.stop()
                await b.stop()

        run(main)


def answers_with_a_hot_prefix(
    tag: str, first: int, send: Callable[[str, list[int]], Awaitable[list[str]]], **kw: Any
) -> list[str]:
    """Engines a and b behind a cache_aware proxy (``kw``: the engines' ``delay``, proxy
    settings), an 8-chunk prefix starting at token ``first`` held by b's agent only;
    ``send(url, prefix)`` sends the requests and returns the engines' answers."""
    delay = kw.pop("delay", 0.0)
    with (
        AgentProcess(name=f"{tag}-a", log_level="warning") as agent_a,
        AgentProcess(name=f"{tag}-b", log_level="warning") as agent_b,
        AgentClient(agent_b.socket_path, namespace=NS, chunk_tokens=CHUNK) as client_b,
    ):
        hot = list(range(first, first + 8 * CHUNK))
        store_prefix(client_b, NS, hot)
        answers: list[str] = []

        async def main() -> None:
            a = await FakeEngine("a", delay=delay).start()
            b = await FakeEngine("b", delay=delay).start()
            try:
                async with proxy(
                    engines=(a.url, b.url),
                    agents=(agent_a.url, agent_b.url),
                    routing="cache_aware",
                    **kw,
                ) as url:
                    answers.extend(await send(url, hot))
            finally:
                await a.stop()
                await b.stop()

        run(main)
        return answers


def test_cache_aware_routing_bounds_the_load_of_a_hot_prefix() -> None:
    async def eight_at_once(url: str, hot: list[int]) -> list[str]:
        replies = await asyncio.gather(
            *(post(url + "/v1/completions", {"prompt": hot}) for _ in range(8))
        )
        return [out["choices"][0]["text"] for _, out in replies]

    served = answers_with_a_hot_prefix("hot", 200, eight_at_once, delay=0.5)
    # Every request wants b; no more than its bounded share may get it: with 8 in flight,
    # ceil(1.25 * 8 / 2) = 5 (the 8 are routed within milliseconds, none finishes before
    # the last is placed).
    assert 4 <= served.count("b-answer") <= 5, served


@pytest.mark.parametrize(("window", "most"), [(64, 10), (0, 16)])
def test_cache_aware_routing_bounds_the_share_of_recent_requests(window: int, most: int) -> None:
    """One request at a time never trips the bound on requests in flight; the window bound
    still keeps the engine that holds the hot prefix to its share: with 16 requests,
    ceil(1.25 * 16 / 2) = 10. Without the window (0) it takes all 16."""

    async def one_at_a_time(url: str, hot: list[int]) -> list[str]:
        served = []
        for _ in range(16):
            status, out = await post(url + "/v1/completions", {"prompt": hot})
            assert status == 200, out
            served.append(out["choices"][0]["text"])
        return served

    served = answers_with_a_hot_prefix("win", 300, one_at_a_time, balance_window=window)
    assert served.count("b-answer") == most, served


def test_cache_aware_routing_survives_an_agent_that_does_not_answer() -> None:
    with AgentProcess(name="alive", log_level="warning") as alive:

        async def main() -> None:
            a, b = await FakeEngine("a").start(), await FakeEngine("b").start()
            try:
                async with proxy(
                    engines=(a.url, b.url),
                    agents=(alive.url, "http://127.0.0.1:9"),  # nothing listens on port 9
                    routing="cache_aware",
                ) as url:
                    for _ in range(4):
                        status, _ = await post(url + "/v1/completions", {"prompt": [1, 2, 3]})
                        assert status == 200
                    _, metrics = await _get(url + "/metrics")
                    assert "meshkv_proxy_prefix_query_failures_total 4.0" in metrics
            finally:
                await a.stop()
                await b.stop()

        run(main)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"engines": ("http://a",), "routing": "cache_aware"}, "needs --agents"),
        ({"engines": ("http://a",), "agents": ("http://x", "http://y")}, "one agent per engine"),
        ({"engines": ("http://a",), "agents": ("x",)}, "must start with http://"),
        (
            {"engines": ("http://a",), "agents": ("http://x",), "load_weight": -1.0},
            "--load-weight must be a finite number >= 0, got -1.0",
        ),
        (
            {"engines": ("http://a",), "agents": ("http://x",), "balance_window": -1},
            "--balance-window must be >= 0",
        ),
    ],
)
def test_bad_cache_aware_config_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ProxyConfig(**kwargs)


async def _get(url: str) -> tuple[int, str]:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.text()
