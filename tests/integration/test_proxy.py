"""``meshkv proxy`` against scripted upstreams: real sockets, the proxy's real aiohttp app,
and small aiohttp servers standing in for engines (the network edge; real engines behind
the proxy are in ``tests/vllm/test_pd.py``).

What the proxy must do with what the engines answer: the prefill leg's rewriting (one token,
not streamed, vLLM's P/D parameters, the decode node to push to), the decode leg's
parameters, SSE relayed as it comes, OpenAI-style 502/504 for failed upstreams, rotation,
the prefill fallback, bad client input, and the aggregated policies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from meshkv.errors import ConfigError
from meshkv.launch import free_port
from meshkv.proxy.app import build_app
from meshkv.proxy.config import ProxyConfig
from meshkv.proxy.serve import make_runner
from tests.helpers.proxy import FakeEngine, get, post, proxy, run, until


def test_pd_legs_are_rewritten_and_the_decode_node_is_pushed_to() -> None:
    async def main() -> None:
        p, d = await FakeEngine("p").start(), await FakeEngine("d", node="node-d").start()
        try:
            async with proxy(prefill=(p.url,), decode=(d.url,)) as url:
                # the proxy probes the decode engine for its agent before pushing to it
                await until(lambda: any((b.get("kv_transfer_params") or {}).get("meshkv_probe")
                                        for b in d.seen))  # fmt: skip
                await asyncio.sleep(0.2)
                body = {"model": "tiny", "prompt": "hi", "max_tokens": 40, "min_tokens": 40,
                        "stream": True, "stream_options": {"include_usage": True},
                        "top_p": 0.5}  # fmt: skip
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(url + "/v1/completions", json=body) as resp,
                ):
                    assert resp.status == 200
                    raw = await resp.read()
                assert raw.count(b"data: ") == 5  # three tokens, usage, [DONE], as they came
                leg_p = p.seen[-1]
                assert leg_p["max_tokens"] == 1 and leg_p["min_tokens"] == 1
                assert leg_p["stream"] is False
                assert "stream_options" not in leg_p and leg_p["top_p"] == 0.5
                assert leg_p["kv_transfer_params"] == {
                    "do_remote_decode": True, "do_remote_prefill": False,
                    "remote_engine_id": None, "remote_block_ids": None, "remote_host": None,
                    "remote_port": None, "meshkv_push_to": "node-d",
                }  # fmt: skip
                leg_d = d.seen[-1]
                assert leg_d["max_tokens"] == 40 and leg_d["min_tokens"] == 40
                assert leg_d["stream"] is True
                meshkv = {"from": "p", "prompt": "hi"}
                assert leg_d["kv_transfer_params"] == {"do_remote_prefill": True, "meshkv": meshkv}
                status, upstreams = await get(url + "/v1/upstreams")
                nodes = {u["role"]: u["node"] for u in upstreams["upstreams"]}
                assert status == 200 and nodes == {"prefill": None, "decode": "node-d"}
        finally:
            await p.stop()
            await d.stop()

    run(main)


def test_anthropic_messages_and_openai_responses_run_pd_with_their_own_fields() -> None:
    """vLLM passes ``kv_transfer_params`` through its Anthropic Messages and OpenAI
    Responses APIs too: their prefill legs take each API's token limit (``max_tokens``,
    ``max_output_tokens``), add no OpenAI-only field (``n``), store no Responses answer;
    the decode leg is the client's request with the prefill's parameters. A stored
    response's follow-up (``previous_response_id``) and a background request run whole on
    the decode engine (the one that holds the conversation; nothing to prefill for), and
    ``GET /v1/responses/{id}`` reaches it."""

    async def main() -> None:
        p, d = await FakeEngine("p").start(), await FakeEngine("d").start()
        try:
            async with proxy(prefill=(p.url,), decode=(d.url,)) as url:
                body = {"model": "tiny", "max_tokens": 20, "system": "be brief",
                        "messages": [{"role": "user", "content": "hi"}],
                        "metadata": {"user_id": "u1"}}  # fmt: skip
                status, answer = await post(url + "/v1/messages", body)
                assert status == 200 and answer["choices"][0]["text"] == "d-answer", answer
                leg_p = p.seen[-1]
                assert leg_p["max_tokens"] == 1 and leg_p["stream"] is False
                assert "n" not in leg_p and leg_p["system"] == "be brief"
                assert leg_p["kv_transfer_params"]["do_remote_decode"] is True
                leg_d = d.seen[-1]
                assert {k: v for k, v in leg_d.items() if k != "kv_transfer_params"} == body
                assert leg_d["kv_transfer_params"]["meshkv"]["from"] == "p"

                body = {"model": "tiny", "input": "hi", "instructions": "be brief",
                        "max_output_tokens": 20, "stream": True}  # fmt: skip
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(url + "/v1/responses", json=body) as resp,
                ):
                    assert resp.status == 200
                    assert (await resp.read()).count(b"data: ") == 4  # as the engine sent them
                leg_p = p.seen[-1]
                assert leg_p["max_output_tokens"] == 1 and leg_p["store"] is False
                assert leg_p["stream"] is False and "max_tokens" not in leg_p and "n" not in leg_p
                leg_d = d.seen[-1]
                assert {k: v for k, v in leg_d.items() if k != "kv_transfer_params"} == body
                assert leg_d["kv_transfer_params"]["meshkv"]["from"] == "p"

                prefills = len(p.seen)
                first = {**body, "stream": False}
                status, answer = await post(url + "/v1/responses", first)
                assert status == 200 and answer["id"] in d.stored and len(p.seen) == prefills + 1
                follow = {**first, "previous_response_id": answer["id"]}
                status, again = await post(url + "/v1/responses", follow)
                assert status == 200 and len(p.seen) == prefills + 1, again  # whole on d
                assert "kv_transfer_params" not in d.seen[-1]
                status, later = await post(url + "/v1/responses", {**first, "background": True})
                assert status == 200 and len(p.seen) == prefills + 1, later
                status, got = await get(url + f"/v1/responses/{later['id']}")
                assert status == 200 and got["served_by"] == "d", got
                status, answer = await post(url + "/v1/messages/count_tokens", {"x": 1})
                assert status == 200 and answer["echo"] == {"x": 1}
        finally:
            await p.stop()
            await d.stop()

    run(main)


def test_a_stored_responses_follow_ups_reach_the_engine_that_holds_it() -> None:
    """vLLM keeps a stored response in the memory of the engine that answered it: a
    follow-up naming it, ``GET /v1/responses/{id}`` and its ``/cancel`` go to that engine
    whatever the routing policy would choose (streamed answers too); a replica that did
    not relay it finds it by asking the engines; an id no engine holds is a clear 404."""

    async def main() -> None:
        a, b = await FakeEngine("a").start(), await FakeEngine("b").start()
        try:
            async with proxy(engines=(a.url, b.url), routing="round_robin") as url:
                for stream in (False, True, False, True):
                    body = {"model": "tiny", "input": "hi", "stream": stream}
                    async with (
                        aiohttp.ClientSession() as http,
                        http.post(url + "/v1/responses", json=body) as resp,
                    ):
                        assert resp.status == 200
                        raw = await resp.read()
                    rid = re.search(rb"resp_[a-z0-9]+", raw)
                    assert rid is not None, raw
                    first = rid.group().decode()
                    holder = a if first in a.stored else b
                    for _ in range(2):  # round robin would send one of these elsewhere
                        follow = {**body, "stream": False, "previous_response_id": first}
                        status, answer = await post(url + "/v1/responses", follow)
                        assert status == 200 and answer["id"] in holder.stored, answer
                    status, got = await get(url + f"/v1/responses/{first}")
                    assert status == 200 and got["served_by"] == holder.name
                    status, got = await post(url + f"/v1/responses/{first}/cancel", {})
                    assert status == 200 and got["served_by"] == holder.name
                status, missing = await get(url + "/v1/responses/resp_nobody")
                assert status == 404, missing
                assert "no healthy engine behind this proxy holds" in missing["error"]["message"]
                status, bad = await get(url + "/v1/responses/..%2Fhealth")
                assert status == 404 and "holds a response '../health'" in bad["error"]["message"]
                async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
                    page = await resp.text()
                assert 'route="/v1/responses/{id}",status="200"} 8.0' in page
                # Another replica of the proxy, which relayed none of them (or this one,
                # restarted): it finds the engine by asking, then remembers it.
                async with proxy(engines=(a.url, b.url), routing="round_robin") as other:
                    for _ in range(3):
                        follow = {"input": "hi", "previous_response_id": first}
                        status, answer = await post(other + "/v1/responses", follow)
                        assert status == 200 and answer["id"] in holder.stored, answer
                    status, got = await get(other + f"/v1/responses/{first}")
                    assert status == 200 and got["served_by"] == holder.name
        finally:
            await a.stop()
            await b.stop()

    run(main)


def test_chat_messages_say_each_apis_conversation_for_tokenize() -> None:
    """What cache-aware routing asks ``/tokenize`` for each API (vLLM renders Anthropic's
    ``system`` and a Responses request's ``instructions`` as a first system message)."""
    from meshkv.proxy.routing import chat_messages, conversation_key

    user = [{"role": "user", "content": "hi"}]
    system = [{"role": "system", "content": "be brief"}]
    assert chat_messages("/v1/chat/completions", {"messages": user}) == user
    assert chat_messages("/v1/messages", {"messages": user}) == user
    assert chat_messages("/v1/messages", {"system": "be brief", "messages": user}) == system + user
    billing = {"type": "text", "text": "x-anthropic-billing-header: cc=1"}  # dropped by vLLM
    blocks = [{"type": "text", "text": "be "}, billing, {"type": "text", "text": "brief"}]
    assert chat_messages("/v1/messages", {"system": blocks, "messages": user}) == system + user
    assert chat_messages("/v1/messages", {"system": "", "messages": user}) == user
    assert chat_messages("/v1/responses", {"input": "hi"}) == user
    assert chat_messages("/v1/responses", {"input": user, "instructions": "be brief"}) == (
        system + user
    )
    parts = [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]
    assert chat_messages("/v1/responses", {"input": parts}) is None  # routed by load alone
    assert chat_messages("/v1/completions", {"prompt": "hi"}) is None

    class Headers:
        headers: dict[str, str] = {}

    assert conversation_key(Headers(), {"metadata": {"user_id": "u1"}}) == "u1"  # type: ignore[arg-type]
    assert conversation_key(Headers(), {"user": "u2", "metadata": {"user_id": "u1"}}) == "u2"  # type: ignore[arg-type]


def test_failed_upstreams_give_clear_errors_and_leave_rotation() -> None:
    async def main() -> None:
        p = await FakeEngine("p").start()
        d = await FakeEngine("d").start()
        slow = await FakeEngine("slow", delay=3.0).start()
        try:
            async with proxy(prefill=(p.url,), decode=(d.url,), prefill_fallback=False) as url:
                p.fail_status = 500
                status, body = await post(url + "/v1/completions", {"prompt": "x"})
                assert status == 500 and "p broke" in json.dumps(body)  # the upstream's answer
                p.fail_status = None
                await d.stop()  # the decode engine goes away
                status, body = await post(url + "/v1/completions", {"prompt": "x"})
                assert status == 502 and body["error"]["type"] == "upstream_error"
                status, body = await post(url + "/v1/completions", {"prompt": "x"})
                assert status == 503 and "no healthy decode" in body["error"]["message"]
                status, _ = await post(url.replace("http", "http") + "/health", {})
            async with proxy(engines=(slow.url,), request_timeout_s=0.5) as url:
                status, body = await post(url + "/v1/completions", {"prompt": "x"})
                assert status == 504 and "timed out" in body["error"]["message"]
        finally:
            for e in (p, d, slow):
                await e.stop()

    run(main)


def test_a_client_that_hangs_up_stops_the_engine_and_is_no_upstream_error() -> None:
    """A client that hangs up, while waiting for a plain answer or in the middle of a
    stream, makes the proxy close its upstream request (so the engine, which aborts a
    request whose connection closes, stops generating for nobody); it is counted as the
    client's doing (status 499), not as the engine's error, and the proxy serves on."""

    async def main() -> None:
        e = await FakeEngine("e", delay=5.0).start()
        try:
            async with proxy(engines=(e.url,)) as url:
                with pytest.raises(TimeoutError):
                    await post(url + "/v1/completions", {"prompt": "x"},
                               timeout=aiohttp.ClientTimeout(total=0.3))  # fmt: skip
                await until(lambda: e.abandoned == ["waiting"], timeout=2.0)
                e.delay, e.stream_chunks = 0.0, 500  # a stream of ~5 s
                async with aiohttp.ClientSession() as http:
                    body = {"prompt": "x", "stream": True}
                    async with http.post(url + "/v1/completions", json=body) as resp:
                        assert resp.status == 200
                        assert (await resp.content.readline()).startswith(b"data: ")
                    # leaving the block unread closes the connection mid-stream
                await until(lambda: e.abandoned == ["waiting", "streaming"], timeout=2.0)
                status, answer = await post(url + "/v1/completions", {"prompt": "ok"})
                assert status == 200 and answer["choices"][0]["text"] == "e-answer"
                async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
                    page = await resp.text()
                closed = 'meshkv_proxy_requests_total{route="/v1/completions",status="499"} 2.0'
                assert closed in page
                errors = [line for line in page.splitlines()
                          if line.startswith("meshkv_proxy_upstream_errors_total")]  # fmt: skip
                assert errors == [], errors
            # P/D: a client gone during the prefill leg ends that leg; no decode follows
            p, d = await FakeEngine("p", delay=5.0).start(), await FakeEngine("d").start()
            try:
                async with proxy(prefill=(p.url,), decode=(d.url,)) as url:
                    with pytest.raises(TimeoutError):
                        await post(url + "/v1/completions", {"prompt": "x"},
                                   timeout=aiohttp.ClientTimeout(total=0.3))  # fmt: skip
                    await until(lambda: p.abandoned == ["waiting"], timeout=2.0)
                    await asyncio.sleep(0.2)
                    params = [b.get("kv_transfer_params") or {} for b in d.seen]
                    assert all(x.get("meshkv_probe") for x in params)  # probes for d's node
            finally:
                await p.stop()
                await d.stop()
        finally:
            await e.stop()

    run(main)


def test_prefill_failure_falls_back_to_the_decode_engine() -> None:
    async def main() -> None:
        p, d = await FakeEngine("p", fail_status=503).start(), await FakeEngine("d").start()
        try:
            async with proxy(prefill=(p.url,), decode=(d.url,)) as url:
                status, body = await post(url + "/v1/completions", {"prompt": "x"})
                assert status == 200 and body["choices"][0]["text"] == "d-answer"
                assert "kv_transfer_params" not in d.seen[-1]  # computed there
                async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
                    page = await resp.text()
                assert "meshkv_proxy_prefill_fallbacks_total 1.0" in page
        finally:
            await p.stop()
            await d.stop()

    run(main)


@pytest.mark.parametrize(
    ("route", "extra", "whole"),
    [
        ("/v1/completions", {"prompt_logprobs": 1}, True),
        ("/v1/completions", {"prompt_logprobs": 0}, True),
        ("/v1/completions", {"echo": True, "logprobs": 2}, True),
        ("/v1/completions", {"echo": True}, False),  # no logprobs: nothing of the prompt's
        ("/v1/completions", {"logprobs": 2}, False),  # the output's logprobs only
        ("/v1/completions", {"prompt_logprobs": None}, False),
        ("/v1/chat/completions", {"echo": True}, True),  # vLLM: top_logprobs defaults to 0
        ("/v1/chat/completions", {"echo": True, "top_logprobs": None}, True),  # null is 0
        ("/v1/chat/completions", {"echo": False, "top_logprobs": 2}, False),
        ("/v1/chat/completions", {"prompt_logprobs": 3}, True),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2}, False),
    ],
)
def test_a_request_that_reads_no_cache_runs_whole_on_a_prefill_engine(
    route: str, extra: dict[str, Any], whole: bool
) -> None:
    """vLLM computes a prompt-logprobs request's whole prompt wherever it runs: a prefill
    leg would be computed twice. It goes once, unchanged, to a prefill engine."""

    async def main() -> None:
        p, d = await FakeEngine("p").start(), await FakeEngine("d").start()
        try:
            async with proxy(prefill=(p.url,), decode=(d.url,)) as url:
                body = {"model": "tiny", "prompt": "x", "max_tokens": 3, **extra,
                        "kv_transfer_params": {"do_remote_prefill": True}}  # fmt: skip
                status, answer = await post(url + route, body)
                assert status == 200
                async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
                    page = await resp.text()
                if whole:
                    assert answer["choices"][0]["text"] == "p-answer"
                    probes = [b for b in d.seen if "meshkv_probe" in str(b)]  # for its node
                    assert d.seen == probes and len(p.seen) == 1
                    sent = {k: v for k, v in body.items() if k != "kv_transfer_params"}
                    assert p.seen[0] == sent  # unchanged, and no transfer asked for
                    assert "meshkv_proxy_whole_on_prefill_total 1.0" in page
                else:
                    assert answer["choices"][0]["text"] == "d-answer"
                    assert p.seen[-1]["max_tokens"] == 1  # the prefill leg
                    assert "meshkv_proxy_whole_on_prefill_total 0.0" in page
        finally:
            await p.stop()
            await d.stop()

    run(main)


def test_with_no_prefill_engine_a_no_cache_request_goes_to_the_decode_engine() -> None:
    async def main() -> None:
        p, d = await FakeEngine("p", healthy=False).start(), await FakeEngine("d").start()
        try:
            async with proxy(prefill=(p.url,), decode=(d.url,)) as url:
                for _ in range(100):  # until the health check took p out of rotation
                    _, ups = await get(url + "/v1/upstreams")
                    if not ups["upstreams"][0]["healthy"]:
                        break
                    await asyncio.sleep(0.05)
                (first, _) = ups["upstreams"]
                assert first["role"] == "prefill" and not first["healthy"]
                status, answer = await post(url + "/v1/completions",
                                            {"prompt": "x", "prompt_logprobs": 1})  # fmt: skip
                assert status == 200 and answer["choices"][0]["text"] == "d-answer"
                assert p.seen == []
                # so do the engine's helper routes (a prefill engine's when one is up)
                status, _ = await post(url + "/tokenize", {"prompt": "x"})
                assert status == 200 and d.auths[-1][0] == "/tokenize"
        finally:
            await p.stop()
            await d.stop()

    run(main)


def test_a_prefill_engine_that_returns_no_transfer_is_counted_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A prefill engine without a KV connector answers no ``kv_transfer_params``: the
    decode engine computes every prompt again. The client is served; the proxy counts it
    and warns once a minute, naming the engine and what to check."""

    async def main() -> None:
        p = await FakeEngine("p", transfers=False).start()
        d = await FakeEngine("d").start()
        try:
            async with proxy(prefill=(p.url,), decode=(d.url,)) as url:
                for _ in range(3):
                    status, answer = await post(url + "/v1/completions", {"prompt": "x"})
                    assert status == 200 and answer["choices"][0]["text"] == "d-answer"
                    assert "kv_transfer_params" not in d.seen[-1]
                async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
                    page = await resp.text()
                assert "meshkv_proxy_prefill_without_params_total 3.0" in page
                _, ups = await get(url + "/v1/upstreams")
                assert ups["upstreams"][0]["prefills_without_params"] == 3
        finally:
            await p.stop()
            await d.stop()

    with caplog.at_level(logging.WARNING, logger="meshkv.proxy.app"):
        run(main)
    said = [r.getMessage() for r in caplog.records]
    warnings = [m for m in said if "without kv_transfer_params" in m]
    assert len(warnings) == 1, warnings  # once a minute, not once a request
    assert "prefill engine http://127.0.0.1:" in warnings[0]
    assert "--kv-transfer-config" in warnings[0]


def test_an_engine_comes_back_into_rotation_when_healthy() -> None:
    async def main() -> None:
        a, b = await FakeEngine("a").start(), await FakeEngine("b").start()
        try:
            async with proxy(engines=(a.url, b.url), routing="round_robin") as url:
                a.healthy = False
                await asyncio.sleep(0.3)
                answers = [(await post(url + "/v1/completions", {"prompt": "x"}))[1]
                           for _ in range(4)]  # fmt: skip
                assert {x["choices"][0]["text"] for x in answers} == {"b-answer"}
                a.healthy = True
                await asyncio.sleep(0.3)
                answers = [(await post(url + "/v1/completions", {"prompt": "x"}))[1]
                           for _ in range(4)]  # fmt: skip
                assert {x["choices"][0]["text"] for x in answers} == {"a-answer", "b-answer"}
        finally:
            await a.stop()
            await b.stop()

    run(main)


def test_sticky_routing_keeps_a_conversation_on_its_engine() -> None:
    async def main() -> None:
        a, b = await FakeEngine("a").start(), await FakeEngine("b").start()
        try:
            async with proxy(engines=(a.url, b.url), routing="sticky") as url:
                first = [(await post(url + "/v1/completions", {"prompt": "x", "user": "u1"}))[1]
                         for _ in range(5)]  # fmt: skip
                assert len({x["choices"][0]["text"] for x in first}) == 1
        finally:
            await a.stop()
            await b.stop()

    run(main)


def test_bad_client_input_is_rejected_and_the_proxy_keeps_serving() -> None:
    async def main() -> None:
        e = await FakeEngine("e").start()
        try:
            async with proxy(engines=(e.url,)) as url:
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(url + "/v1/completions", data=b"{nope") as resp,
                ):
                    assert resp.status == 400
                    assert "not JSON" in (await resp.json())["error"]["message"]
                status, body = await post(url + "/v1/completions", [1, 2])
                assert status == 400 and "JSON object" in body["error"]["message"]
                status, body = await post(url + "/v1/completions", {"prompt": "ok"})
                assert status == 200
                status, models = await get(url + "/v1/models")
                assert status == 200 and models["data"][0]["id"] == "tiny"
        finally:
            await e.stop()

    run(main)


def test_engines_with_an_api_key_see_the_clients_credentials() -> None:
    """vLLM's ``--api-key`` guards every /v1 path. Every request made for a client
    carries the client's ``Authorization`` header (prefill and decode legs, routed
    requests, /v1/models, helpers), so the engines decide; the proxy's own requests (which
    agent a decode engine uses) carry ``upstream_api_key`` and nothing else does."""

    async def main() -> None:
        key = "k-123"
        p = await FakeEngine("p", api_key=key).start()
        d = await FakeEngine("d", node="node-d", api_key=key).start()
        try:
            async with proxy(prefill=(p.url,), decode=(d.url,), upstream_api_key=key) as url:
                await until(lambda: any((b.get("kv_transfer_params") or {}).get("meshkv_probe")
                                        for b in d.seen))  # the probe got through  # fmt: skip
                mine = {"Authorization": "Bearer k-123"}
                status, answer = await post(url + "/v1/completions", {"prompt": "x"},
                                            headers=mine)  # fmt: skip
                assert status == 200 and answer["choices"][0]["text"] == "d-answer"
                assert p.seen[-1]["kv_transfer_params"]["meshkv_push_to"] == "node-d"
                status, _ = await post(url + "/tokenize", {"prompt": "x"}, headers=mine)
                assert status == 200 and p.auths[-1] == ("/tokenize", "Bearer k-123")
                async with aiohttp.ClientSession() as http:
                    async with http.get(url + "/v1/models", headers=mine) as resp:
                        assert resp.status == 200
                    async with http.get(url + "/v1/models") as resp:
                        assert resp.status == 401  # the engine's answer
                p.auths.clear()
                d.auths.clear()
                status, answer = await post(url + "/v1/completions", {"prompt": "x"})
                assert status == 401, answer  # no credentials of the client's: the engine's no
                wrong = {"Authorization": "Bearer nope"}
                status, _ = await post(url + "/v1/completions", {"prompt": "x"}, headers=wrong)
                assert status == 401
                sent = [a for path, a in p.auths + d.auths if path != "/health"]
                assert sent and "Bearer k-123" not in sent  # the proxy's key never lent out
        finally:
            await p.stop()
            await d.stop()

    run(main)


def test_engine_helper_routes_pass_through_and_other_paths_are_a_clear_404() -> None:
    async def main() -> None:
        e = await FakeEngine("e").start()
        try:
            async with proxy(engines=(e.url,)) as url:
                status, answer = await post(url + "/tokenize?add_special=1", {"prompt": "hi"})
                assert status == 200
                assert answer == {"tokens": [1, 2, 3], "echo": {"prompt": "hi"},
                                  "query": {"add_special": "1"}}  # fmt: skip
                status, answer = await post(url + "/v1/embeddings", {"input": "hi"})
                assert status == 200 and answer["echo"] == {"input": "hi"}
                status, answer = await post(url + "/detokenize", {"tokens": [1]})
                assert status == 404  # the engine's own answer: this one serves no such path
                status, answer = await post(url + "/v1/nothing", {})
                assert status == 404 and answer["error"]["type"] == "invalid_request_error"
                assert "serves no POST /v1/nothing" in answer["error"]["message"]
                assert "/v1/chat/completions" in answer["error"]["message"]
                async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
                    page = await resp.text()
                assert 'meshkv_proxy_requests_total{route="/tokenize",status="200"} 1.0' in page
                assert 'meshkv_proxy_requests_total{route="other",status="404"} 1.0' in page
            await e.stop()
            async with proxy(engines=(e.url,)) as url:  # its engine gone
                status, answer = await post(url + "/tokenize", {"prompt": "hi"})
                assert status in (502, 503) and "error" in answer, answer
        finally:
            await e.stop()

    run(main)


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (None, 0o600, "cannot read --upstream-api-key-file .*: No such file"),
        ("key\n", 0o644, "accessible by group or others .* chmod 600"),
        ("  \n", 0o600, "must hold one key with no spaces, got an empty file"),
        ("two words", 0o600, "whitespace inside the key"),
    ],
)
def test_a_bad_upstream_api_key_file_is_refused(
    tmp_path: Path, content: str | None, mode: int, message: str
) -> None:
    from meshkv.cli.main import build_parser
    from meshkv.cli.proxy_cmd import build_config

    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
        path.chmod(mode)
    argv = ["proxy", "--engines", "http://a:1", "--upstream-api-key-file", str(path)]
    with pytest.raises(ConfigError, match=message):
        build_config(build_parser().parse_args(argv))
    if content is None:  # and a good one is read, whitespace around it stripped
        path.write_text(" k-1\n")
        path.chmod(0o600)
        assert build_config(build_parser().parse_args(argv)).upstream_api_key == "k-1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give --prefill URL"),
        ({"prefill": ("http://a",)}, "needs both --prefill and --decode"),
        ({"prefill": ("http://a",), "decode": ("http://b",), "engines": ("http://c",)},
         "either --prefill/--decode"),
        ({"engines": ("ftp://a",)}, "--engines: upstream URL must start with http"),
        ({"engines": ("http://127.0.0.1:abc",)}, "--engines: 'http://127.0.0.1:abc' has a bad"),
        ({"prefill": ("http://p:70000",), "decode": ("http://d",)}, "--prefill: .* bad port"),
        ({"engines": ("http://h:",)}, "bad port"),
        ({"engines": ("http://",)}, "--engines: 'http://' names no host"),
        ({"prefill": ("http://p",), "decode": ("http://d:8000/v1/",)},
         r"--decode: 'http://d:8000/v1/' ends in /v1; give the server's base URL \('http://d:8000'\)"),
        ({"engines": ("http://e?x=1",)}, "without a \\?query"),
        ({"engines": ("http://a",), "routing": "fastest"}, "--routing must be one of"),
        ({"engines": ("http://a",), "agents": ("http://x", "http://y")}, "one agent per engine"),
        ({"engines": ("http://a:1", "http://b:1", "http://a:1/")},
         "--engines names http://a:1 more than once"),
        ({"prefill": ("http://p",), "decode": ("http://d", "http://d")}, "--decode names"),
        ({"engines": ("http://a",), "request_timeout_s": 0},
         "--request-timeout must be a positive number of seconds, got 0"),
        ({"engines": ("http://a",), "prefill_timeout_s": float("nan")}, "--prefill-timeout"),
        ({"engines": ("http://a",), "load_weight": float("inf")},
         "--load-weight must be a finite number >= 0, got inf"),
        ({"engines": ("http://a",), "drain_s": -1.0}, "--drain-seconds must be a finite"),
        ({"prefill": ("http://a:1",), "decode": ("http://b:1",), "batch_prefills": 0},
         "--batch-prefills must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_bad_config_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ProxyConfig(**kwargs)


def test_good_base_urls_are_taken() -> None:
    for url in ("http://[::1]:9", "https://gateway/engine-0", "http://h:8000/", "http://h"):
        assert ProxyConfig(engines=(url,)).engines == (url,)


def test_a_listen_port_in_use_is_a_clear_error() -> None:
    """The real command, given a port another process holds: exit 1 and one line naming
    the address, no traceback and no unclosed upstream sessions reported on the way out."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "meshkv", "proxy", "--listen", f"127.0.0.1:{port}",
             "--engines", "http://127.0.0.1:9"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert f"meshkv proxy: error: cannot serve on 127.0.0.1:{port}: " in out.stderr
    assert "address already in use" in out.stderr and "pass a free --listen" in out.stderr
    assert "Traceback" not in out.stderr and "Unclosed" not in out.stderr


def test_sigterm_drains_requests_in_flight() -> None:
    """The real command, stopped with SIGTERM while a request is in flight (a rolling
    restart): the request is answered and the proxy exits 0; with a ``--drain-seconds``
    shorter than the request, the proxy exits at that budget, not at the request's end,
    and the request cut off is told so: a 503 saying why, or, when its stream has begun,
    an error event and ``[DONE]`` after what was streamed (it was a dropped connection)."""

    async def one(drain_s: float, stream: bool, **engine: Any) -> tuple[Any, float, int | None]:
        e = await FakeEngine("e", **engine).start()
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshkv", "proxy", "--engines", e.url,
            "--listen", f"127.0.0.1:{port}", "--drain-seconds", str(drain_s),
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if (await get(url + "/v1/upstreams"))[0] == 200:
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            body = {"prompt": "x", "stream": stream}
            asked = asyncio.create_task(post(url + "/v1/completions", body))
            await until(lambda: len(e.seen) == 1)
            await asyncio.sleep(0.3)  # a stream has begun
            proc.send_signal(signal.SIGTERM)
            stopping = asyncio.get_running_loop().time()
            try:
                answer: Any = await asked
            except aiohttp.ClientError as exc:
                answer = exc
            await asyncio.wait_for(proc.wait(), 20)
            return answer, asyncio.get_running_loop().time() - stopping, proc.returncode
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await e.stop()

    async def main() -> None:
        answer, took, rc = await one(drain_s=30.0, stream=False, delay=1.0)
        assert answer[0] == 200 and answer[1]["choices"][0]["text"] == "e-answer", answer
        assert rc == 0
        answer, took, rc = await one(drain_s=0.5, stream=False, delay=10.0)
        assert rc == 0 and took < 5.0, took  # not the 10 s the engine would take
        assert answer[0] == 503, answer
        error = answer[1]["error"]
        assert error["type"] == "unavailable" and error["code"] == 503, error
        assert "shutting down" in error["message"] and "--drain-seconds (0.5 s)" in error["message"]
        answer, took, rc = await one(drain_s=0.5, stream=True, stream_chunks=100, chunk_delay=0.1)
        assert rc == 0 and took < 5.0, took  # not the 10 s the stream would take
        status, text = answer
        assert status == 200, answer
        events = [e.removeprefix("data: ") for e in text.strip().split("\n\n")]
        assert events[-1] == "[DONE]", events[-3:]
        assert "shutting down" in json.loads(events[-2])["error"]["message"], events[-2]
        assert len(events) > 3 and all('"choices"' in e for e in events[:-2]), events

    run(main, limit=60.0)


def test_a_stream_cut_off_ends_in_its_apis_own_error_event() -> None:
    """An Anthropic Messages stream cut off at the drain deadline ends with Anthropic's
    ``event: error`` (as vLLM sends it), with no ``[DONE]`` (those streams have none);
    completions and chat get OpenAI's error event and ``[DONE]``; Responses no ``[DONE]``."""
    from meshkv.proxy.answers import error_response, stream_error

    async def main() -> None:
        e = await FakeEngine("e", stream_chunks=500, chunk_delay=0.05).start()
        try:
            cfg = ProxyConfig(port=free_port(), engines=(e.url,), drain_s=0.3)
            runner = make_runner(build_app(cfg), cfg.drain_s)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", cfg.port).start()
            body = {"model": "tiny", "messages": [], "max_tokens": 9, "stream": True}
            async with aiohttp.ClientSession() as http:
                async with http.post(f"http://127.0.0.1:{cfg.port}/v1/messages",
                                     json=body) as resp:  # fmt: skip
                    assert resp.status == 200
                    await resp.content.readline()  # streaming
                    stopped = asyncio.create_task(runner.cleanup())
                    raw = await resp.read()
                await stopped
            last = raw.strip().split(b"\n\n")[-1].decode()
            head, data = last.split("\n")
            assert head == "event: error", last
            error = json.loads(data.removeprefix("data: "))
            assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
            assert "shutting down" in error["error"]["message"] and b"[DONE]" not in raw
        finally:
            await e.stop()

    run(main)
    failure = error_response(502, "upstream x failed", "upstream_error")
    chat = stream_error("/v1/chat/completions", failure, done=True).decode()
    assert chat.endswith("data: [DONE]\n\n") and '"upstream x failed"' in chat
    assert stream_error("/v1/completions", failure).decode().count("data: ") == 1
    responses = stream_error("/v1/responses", failure, done=True).decode()
    assert responses.startswith("data: {") and "[DONE]" not in responses


def test_repeated_url_flags_add_up() -> None:
    """``--engines A --engines B`` is two engines (the second flag used to replace the
    first in silence)."""
    from meshkv.cli.main import build_parser
    from meshkv.cli.proxy_cmd import build_config

    argv = ["proxy", "--engines", "http://a:1", "--engines", "http://b:1", "http://c:1"]
    config = build_config(build_parser().parse_args(argv))
    assert config.engines == ("http://a:1", "http://b:1", "http://c:1")
