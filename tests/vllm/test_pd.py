"""Prefill/decode disaggregation end to end over TCP: through ``meshkv proxy``, and the
same flow driven by a client as vLLM's toy proxy does it; the producer's pins; the next
turn of a conversation; a producer agent killed between prefill and decode (last: it
restarts that agent). (``test_pd_ucx.py``: the same stack over UCX.)

Every output is compared with one plain engine's (no connector, same thread binding).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from meshkv.launch import HttpProcess, http_get, prometheus_sum
from meshkv.proxy.routing import chat_messages, reads_no_cache
from tests.helpers.mesh import wait_converged
from tests.vllm.pd import (
    BLOCK,
    CHAT,
    PROMPTS,
    TRANSFER_TIMEOUT_S,
    Stack,
    check_outputs_and_decode_work,
    check_pins_released,
    computed,
    logs,
    pd_stack,
    post,
    settle_metrics,
    text_of,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with pd_stack("tcp", tiny_model, tmp_path_factory.mktemp("pd-tcp")) as built:
        yield built


def test_through_the_proxy_outputs_equal_one_engine_and_decode_computes_one_token(
    stack: Stack,
) -> None:
    check_outputs_and_decode_work(stack)
    # Control: the counter does count. The same prompt sent straight to the decode engine
    # with no transfer is computed there (only its whole chunks can come from the agent).
    route, body = stack.requests["p333"]
    before = computed(stack.decode)
    post(stack.decode.base_url + route, {**body, "prompt": PROMPTS["p333"][:300] + [7] * 33})
    assert settle_metrics(stack.decode, before) >= 300 - 256


def test_cache_aware_routing_tokenizes_each_api_as_the_engine_does(stack: Stack) -> None:
    """Cache-aware routing asks an engine's ``/tokenize`` for a chat, Anthropic Messages or
    Responses request's prompt as chat messages (``chat_messages``): as many tokens as
    the engine's own answer says its prompt had, or the prefix queries would find
    nothing."""
    for name, used_field in (("chat", "prompt_tokens"), ("messages", "input_tokens"),
                             ("responses", "input_tokens")):  # fmt: skip
        route, body = stack.requests[name]
        usage = post(stack.proxy.base_url + route, body)["usage"]
        # Anthropic's input_tokens leave out those read from a cache
        used = usage[used_field] + usage.get("cache_read_input_tokens", 0)
        query = {"model": body["model"], "messages": chat_messages(route, body)}
        assert post(stack.prefill.base_url + "/tokenize", query)["count"] == used, name


def test_a_chained_responses_conversation_through_the_proxy(stack: Stack) -> None:
    """With vLLM's response store on, a Responses request stored on the decode engine is
    followed up through the proxy (``previous_response_id``: it runs whole on that
    engine, the one that has the conversation; a prefill engine would answer 404) and
    read back with ``GET /v1/responses/{id}``."""
    route, body = stack.requests["responses"]
    first = post(stack.proxy.base_url + route, {**body, "store": True})
    follow = {**body, "input": "and then?", "previous_response_id": first["id"]}
    second = post(stack.proxy.base_url + route, follow)
    assert second["previous_response_id"] == first["id"] and second["status"] != "failed"
    # the second turn's prompt holds the first turn's: longer than the first's
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"], (first, second)
    got = json.loads(http_get(stack.proxy.base_url + f"/v1/responses/{first['id']}"))
    assert got["id"] == first["id"] and text_of(got) == text_of(first)


def test_client_driven_flow_like_vllms_toy_proxy(stack: Stack) -> None:
    """POST to P with the toy proxy's parameters, then POST the original request with the
    parameters P returned to D: no push target named, so the decode agent pulls."""
    route, body = stack.requests["p1000"]
    prompt = [11] + PROMPTS["p1000"][1:]  # no chunk of it was prefilled before
    body = {**body, "prompt": prompt}
    toy = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
           "remote_block_ids": None, "remote_host": None, "remote_port": None}  # fmt: skip
    first = post(
        stack.prefill.base_url + route,
        {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": toy},
    )
    params = first["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["meshkv"]["producer"] == "node-p"
    pulls = stack.decode_agent.metric("meshkv_peer_pulls_total")
    before = computed(stack.decode)
    answer = post(stack.decode.base_url + route, {**body, "kv_transfer_params": params})
    assert settle_metrics(stack.decode, before) <= BLOCK
    assert stack.decode_agent.metric("meshkv_peer_pulls_total") >= pulls + 4  # 3 full + tail
    plain_ref = post(stack.prefill.base_url + route, body)  # P computes it like any engine
    assert text_of(answer) == text_of(plain_ref)


def test_a_transfer_the_decode_engine_cannot_use_is_released_at_once(stack: Stack) -> None:
    """A decode request whose prompt is not the prefill's (here: its last token differs)
    cannot use the transfer; its engine says so when vLLM first looks at the request
    (vLLM's ``on_new_request`` started tracking it), through its agent, and the producer
    lets go at once instead of pinning the chunks for ``transfer_hold_s`` (60 s)."""
    route, body = stack.requests["p333"]
    toy = {"do_remote_decode": True, "do_remote_prefill": False}
    prompt = [23, *PROMPTS["p333"][1:]]
    first = post(
        stack.prefill.base_url + route,
        {**body, "prompt": prompt, "max_tokens": 1, "stream": False, "kv_transfer_params": toy},
    )
    params = first["kv_transfer_params"]
    assert stack.prefill_agent.metric("meshkv_transfer_pins") > 0
    released = stack.prefill_agent.metric("meshkv_transfers_ended_total", 'how="released"')
    other = [*prompt[:-1], prompt[-1] + 1]
    post(stack.decode.base_url + route, {**body, "prompt": other, "kv_transfer_params": params})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and stack.prefill_agent.metric("meshkv_transfer_pins"):
        time.sleep(0.1)
    assert stack.prefill_agent.metric("meshkv_transfer_pins") == 0, logs(stack)
    assert (
        stack.prefill_agent.metric("meshkv_transfers_ended_total", 'how="released"') == released + 1
    )
    assert stack.decode_agent.metric("meshkv_transfers_abandoned_total") == 1


def test_producer_pins_are_released_by_the_consumer(stack: Stack) -> None:
    check_pins_released(stack)


def test_a_client_that_hangs_up_ends_the_request_on_the_engine(stack: Stack) -> None:
    """Through the proxy, a client that hangs up mid-stream ends the decode engine's
    request (vLLM stops generating), the proxy counts it as 499 and not as the engine's
    error, and the transfer's pins are still released."""
    route, body = stack.requests["p333"]
    long = {**body, "prompt": [13, *PROMPTS["p333"][1:]], "max_tokens": 3000,
            "ignore_eos": True, "stream": True}  # fmt: skip
    errors = prometheus_sum(http_get(stack.proxy.base_url + "/metrics").decode(),
                            "meshkv_proxy_upstream_errors_total")  # fmt: skip
    generated = vllm_metric(stack.decode, "vllm:generation_tokens_total")
    request = urllib.request.Request(
        stack.proxy.base_url + route, data=json.dumps(long).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as response:
        for _ in range(5):  # a few tokens: the decode engine is generating
            assert response.readline().startswith(b"data: ") and response.readline() == b"\n"
        assert vllm_metric(stack.decode, "vllm:num_requests_running") == 1
    deadline = time.monotonic() + 10
    while vllm_metric(stack.decode, "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vllm_metric(stack.decode, "vllm:num_requests_running") == 0, logs(stack)
    time.sleep(0.3)  # vLLM logs its counters after the step
    made = vllm_metric(stack.decode, "vllm:generation_tokens_total") - generated
    assert 5 <= made < 1000, f"{made} of 3000 tokens generated: the request was not ended"
    page = http_get(stack.proxy.base_url + "/metrics").decode()
    assert prometheus_sum(page, "meshkv_proxy_requests_total", 'status="499"') == 1
    assert prometheus_sum(page, "meshkv_proxy_upstream_errors_total") == errors
    check_pins_released(stack)


def vllm_metric(server: HttpProcess, name: str) -> float:
    return prometheus_sum(http_get(server.base_url + "/metrics").decode(), name)


def test_next_turn_prefill_reuses_what_the_decode_node_made(stack: Stack) -> None:
    """Multi-turn with a conversation id: the decode engine saves the chunks its answer
    fills (``save_decode_tokens``); the next turn's prefill finds them through the mesh
    and pulls them from the decode node. No special case in the proxy."""
    route, body = stack.requests["p700"]
    turn1 = [17] + PROMPTS["p700"][1:]
    headers = {"X-Conversation-Id": "conv-1"}
    first = post(
        stack.proxy.base_url + route,
        {**body, "prompt": turn1, "max_tokens": 80, "return_token_ids": True},
        headers=headers,
    )
    answer = first["choices"][0]["token_ids"]
    assert len(answer) == 80  # 700 + 80 tokens: the third chunk (512..767) is now full
    time.sleep(1.0)  # holders are announced to the keys' homes in 50 ms batches
    pulls = stack.prefill_agent.metric("meshkv_peer_pulls_total")
    turn2 = turn1 + answer + [19] * 50
    second = post(stack.proxy.base_url + route, {**body, "prompt": turn2}, headers=headers)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]  # the prefill side's
    assert cached == 768, cached  # its own 2 chunks + the one the decode node made
    assert stack.prefill_agent.metric("meshkv_peer_pulls_total") >= pulls + 1


def test_a_batch_of_prompts_through_the_proxy(stack: Stack) -> None:
    """A completions request with several prompts: each gets its own transfer (vLLM
    answers a batch with one prompt's parameters), the decode engine computes at most one
    block of each, the answer equals the prompts' answers one by one, and no transfer is
    left to expire on the producer."""
    route, body = stack.requests["p333"]
    prompts = [[47] + PROMPTS["p700"][1:], [48] + PROMPTS["p333"][1:], [49] + PROMPTS["p1000"][1:]]
    before = computed(stack.decode)
    answer = post(stack.proxy.base_url + route, {**body, "prompt": prompts})
    assert settle_metrics(stack.decode, before) <= len(prompts) * BLOCK, logs(stack)
    url = stack.prefill.base_url + route
    singles = [text_of(post(url, {**body, "prompt": p})) for p in prompts]
    assert [c["text"] for c in answer["choices"]] == singles
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    assert answer["usage"]["prompt_tokens"] == 700 + 333 + 1000
    check_pins_released(stack)
    # Streamed: the same, as one stream with vLLM's batch indices and summed usage.
    prompts = [[50] + p[1:] for p in prompts]
    before = computed(stack.decode)
    streamed = {**body, "prompt": prompts, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
    request = urllib.request.Request(
        stack.proxy.base_url + route, data=json.dumps(streamed).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    texts: dict[int, str] = {}
    usage = None
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            usage = event.get("usage") or usage
    assert settle_metrics(stack.decode, before) <= len(prompts) * BLOCK, logs(stack)
    singles = [text_of(post(url, {**body, "prompt": p})) for p in prompts]
    assert [texts[i] for i in range(3)] == singles and len(texts) == 3
    assert usage is not None and usage["prompt_tokens"] == 700 + 333 + 1000
    check_pins_released(stack)


def test_prompt_logprobs_run_whole_on_the_prefill_engine(stack: Stack) -> None:
    """vLLM computes every token of a prompt whose logprobs are asked for, whatever any
    cache holds. Through the proxy such a request runs once, whole, on the prefill
    engine: no prefill leg, no transfer, nothing computed by the decode engine, and the
    connector asks its agent nothing for it."""
    route, body = stack.requests["p700"]
    body = {**body, "prompt": [29] + PROMPTS["p700"][1:], "prompt_logprobs": 1}
    proxy_page = stack.proxy.base_url + "/metrics"
    whole = prometheus_sum(http_get(proxy_page).decode(), "meshkv_proxy_whole_on_prefill_total")
    ended = stack.prefill_agent.metric("meshkv_transfers_ended_total")
    lookups = stack.prefill_agent.metric("meshkv_lookups_total")
    on_p, on_d = computed(stack.prefill), computed(stack.decode)
    answer = post(stack.proxy.base_url + route, body)
    assert len(answer["choices"][0]["prompt_logprobs"]) == 700
    assert settle_metrics(stack.prefill, on_p) == 700
    assert computed(stack.decode) == on_d
    after = http_get(proxy_page).decode()
    assert prometheus_sum(after, "meshkv_proxy_whole_on_prefill_total") == whole + 1
    assert stack.prefill_agent.metric("meshkv_lookups_total") == lookups
    time.sleep(0.5)  # a transfer would be held by now
    assert stack.prefill_agent.metric("meshkv_transfers_open") == 0
    assert stack.prefill_agent.metric("meshkv_transfers_ended_total") == ended
    plain = {k: v for k, v in body.items() if k != "prompt_logprobs"}
    assert text_of(answer) == text_of(post(stack.decode.base_url + route, plain))


NO_CACHE_CASES = [
    ("/v1/completions", {"prompt_logprobs": 0}),
    ("/v1/completions", {"echo": True, "logprobs": 1}),
    ("/v1/completions", {"echo": True}),
    ("/v1/completions", {"logprobs": 1}),
    ("/v1/chat/completions", {"echo": True}),
    ("/v1/chat/completions", {"echo": True, "top_logprobs": None}),
    ("/v1/chat/completions", {"echo": False, "logprobs": True, "top_logprobs": 2}),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 1}),
]


@pytest.mark.parametrize("case", range(len(NO_CACHE_CASES)))
def test_the_proxys_no_cache_rule_is_vllms(stack: Stack, case: int) -> None:
    """The proxy decides which requests vLLM computes whole from their fields
    (``reads_no_cache``); the engine itself says whether that is right: the same request
    sent twice, and the second computes its whole prompt exactly when the rule says so."""
    route, extra = NO_CACHE_CASES[case]
    tag = 900 + case  # a prompt of this case's own (the tiny model has 1,024 tokens)
    if route == "/v1/completions":
        body = {"model": "tiny", "prompt": [tag] + PROMPTS["p700"][1:], "max_tokens": 2}
    else:
        messages = [CHAT[0], {"role": "user", "content": f"case {tag}: {CHAT[1]['content']}"}]
        body = {"model": "tiny", "messages": messages, "max_tokens": 2}
    body.update(extra)
    first = post(stack.decode.base_url + route, body)
    time.sleep(0.5)  # its chunks committed
    before = computed(stack.decode)
    post(stack.decode.base_url + route, body)
    made = settle_metrics(stack.decode, before)
    prompt = first["usage"]["prompt_tokens"]
    if reads_no_cache(route, body):
        assert made == prompt, f"the rule says vLLM computes all {prompt} tokens; it made {made}"
    else:
        assert made < prompt, f"the rule says vLLM reads its caches; it computed all {made}"


def test_prefill_agent_stalled_across_the_prefill_still_transfers(stack: Stack) -> None:
    """The producer's agent answers nothing for 1 s while the prefill runs (SIGSTOP): the
    prefill's lookup misses (zero hits), its reserve is answered late but within
    ``transfer_save_timeout_s``, so the save happens and the decode engine loads the prompt.
    (With the ordinary 0.5 s save deadline the save was skipped and the decode engine
    computed all 333 tokens.)"""
    route, body = stack.requests["p333"]
    body = {**body, "prompt": [23] + PROMPTS["p333"][1:]}  # no chunk of it prefilled before
    toy = {"do_remote_decode": True, "do_remote_prefill": False}
    agent = stack.prefill_agent.proc
    assert agent is not None
    os.kill(agent.pid, signal.SIGSTOP)
    resume = threading.Timer(1.0, os.kill, (agent.pid, signal.SIGCONT))
    resume.start()
    try:
        first = post(
            stack.prefill.base_url + route,
            {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": toy},
        )
    finally:
        resume.join()
        os.kill(agent.pid, signal.SIGCONT)
    params = first["kv_transfer_params"]
    before = computed(stack.decode)
    answer = post(stack.decode.base_url + route, {**body, "kv_transfer_params": params})
    assert settle_metrics(stack.decode, before) <= BLOCK, logs(stack)
    assert text_of(answer) == text_of(post(stack.prefill.base_url + route, body))


def test_prefill_agent_killed_between_prefill_and_decode(stack: Stack) -> None:
    """The producer's agent dies after the prefill answered: the decode engine waits at
    most its transfer timeout, recomputes, and answers correctly. No request fails."""
    route, body = stack.requests["p700"]
    prompt = [13] + PROMPTS["p700"][1:]  # no chunk of it was prefilled before
    body = {**body, "prompt": prompt}
    toy = {"do_remote_decode": True, "do_remote_prefill": False}
    first = post(
        stack.prefill.base_url + route,
        {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": toy},
    )
    stack.prefill_agent.kill()
    started = time.monotonic()
    params = first["kv_transfer_params"]
    answer = post(stack.decode.base_url + route, {**body, "kv_transfer_params": params})
    elapsed = time.monotonic() - started
    assert elapsed < TRANSFER_TIMEOUT_S + 8, elapsed
    reference = post(stack.prefill.base_url + route, body)  # P serves on without its agent
    assert text_of(answer) == text_of(reference)
    # Back on the same socket, joining through the decode node's agent: the prefill
    # engine's connector reconnects by itself and the two agents mesh again.
    seed = stack.decode_agent.get_json("/v1/status")["mesh"]["address"]
    stack.prefill_agent.args += ["--join", seed]
    stack.prefill_agent.start()
    wait_converged([stack.prefill_agent, stack.decode_agent], timeout=30)
