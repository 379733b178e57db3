"""A decode engine that preempts a request loads its prompt again from its own agent (the
transfer brought the chunks there) instead of computing it: a P/D stack whose decode
engine has a KV cache too small for four concurrent requests.

vLLM's ``prompt_tokens_by_source`` counts a request's prompt once, at its first
scheduling, so it cannot show a recompute after a preemption; the decode agent's reads
can. (Checked by hand against the code without reloads: the same outputs, 12 reads
instead of 15.)
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from meshkv.launch import http_get, prometheus_sum
from tests.vllm.pd import Stack, pd_stack, post

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

_rng = random.Random(77)
PROMPTS = [[_rng.randrange(3, 1000) for _ in range(700)] for _ in range(4)]
READS_PER_LOAD = 3
"""Two whole chunks and the 188-token tail of each 700-token prompt."""


@pytest.fixture(scope="module")
def stack(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # ~2,900 tokens of KV on the decode engine: three requests of 700 + 380 cannot all stay
    with pd_stack(
        "tcp", tiny_model, tmp_path_factory.mktemp("pd-pre"), decode_kv_bytes=3 << 19
    ) as built:
        yield built


def test_a_request_preempted_on_the_decode_engine_is_loaded_again(stack: Stack) -> None:
    # vLLM's toy-proxy flow, so that the four decode requests reach D at the same moment
    # (through meshkv proxy each waits for its own prefill, and they may not overlap).
    toy = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
           "remote_block_ids": None, "remote_host": None, "remote_port": None}  # fmt: skip
    bodies = [{"model": "tiny", "prompt": p, "max_tokens": 380, "temperature": 0,
               "ignore_eos": True} for p in PROMPTS]  # fmt: skip
    params = [
        post(stack.prefill.base_url + "/v1/completions",
             {**b, "max_tokens": 1, "kv_transfer_params": toy})["kv_transfer_params"]
        for b in bodies
    ]  # fmt: skip
    before = http_get(stack.decode.base_url + "/metrics").decode()
    reads = stack.decode_agent.metric("meshkv_hit_chunks_total")  # pulled, then read
    answers: list[dict[str, Any] | None] = [None] * len(PROMPTS)

    def ask(i: int) -> None:
        body = {**bodies[i], "kv_transfer_params": params[i]}
        answers[i] = post(stack.decode.base_url + "/v1/completions", body, timeout=240)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    after = http_get(stack.decode.base_url + "/metrics").decode()
    assert all(a is not None and a["usage"]["completion_tokens"] == 380 for a in answers)
    preempted = prometheus_sum(after, "vllm:num_preemptions_total") - prometheus_sum(
        before, "vllm:num_preemptions_total"
    )
    assert preempted >= 1, "the setup no longer makes vLLM preempt; shrink the KV cache"
    loads = stack.decode_agent.metric("meshkv_hit_chunks_total") - reads
    assert loads >= READS_PER_LOAD * (len(PROMPTS) + 1), (loads, preempted)
