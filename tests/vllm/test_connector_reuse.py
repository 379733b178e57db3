"""Real vLLM engines reusing KV through a real meshkv agent (in-process engine mode)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.helpers.agents import AgentProcess
from tests.vllm.engines import EngineRun, Prompts, wait_until

pytestmark = pytest.mark.vllm


def test_same_prompt_and_shared_prefix_hit_with_identical_output(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    agent = agents().start()
    result = engine(
        [prompts.a, prompts.a, prompts.b], connector={"socket_path": agent.socket_path}
    ).result()
    first, second, shared = result["outputs"]
    # Cold: nothing stored yet. Warm: both full chunks of A (never the whole prompt).
    assert first["cached_tokens"] == 0
    assert second["cached_tokens"] == 512
    # B shares 300 tokens with A: exactly one full 256-token chunk.
    assert shared["cached_tokens"] == 256
    assert first["tokens"] == baseline["a"]
    assert second["tokens"] == baseline["a"]
    assert shared["tokens"] == baseline["b"]
    counters = result["counters"]
    assert counters["lookups"] == 3
    assert counters["hit_tokens"] == 512 + 256
    assert counters["loaded_chunks"] == 3
    assert counters["load_errors"] == 0
    # A's two chunks, then B's second chunk (its first is A's).
    assert counters["saved_chunks"] == 3
    with agent.client() as client:
        assert client.stats()["tiers"]["cpu"]["chunks"] == 3


def test_fresh_engine_process_loads_what_another_stored(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    agent = agents().start()
    conn = {"socket_path": agent.socket_path}
    writer = engine([prompts.c], connector=conn).result()
    assert writer["outputs"][0]["cached_tokens"] == 0
    assert writer["counters"]["saved_chunks"] == 2

    reader = engine([prompts.c], connector=conn).result()
    (out,) = reader["outputs"]
    assert out["cached_tokens"] == 512
    assert out["tokens"] == baseline["c"]
    assert reader["counters"]["loaded_chunks"] == 2
    assert reader["counters"]["saved_chunks"] == 0


def test_agent_killed_while_serving_then_restarted(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    agent = agents(args=["--write-through"]).start()
    run = engine(
        [prompts.a, prompts.a, prompts.a, prompts.d, prompts.a],
        connector={"socket_path": agent.socket_path, "retry_interval_s": 0.2},
        pause_before=[2, 4],
    )
    run.wait_ready(2)
    with agent.client() as client:
        wait_until(lambda: client.stats()["tiers"]["ssd"]["chunks"] >= 2, what="write-through")
    agent.kill()  # SIGKILL: no flush, no goodbye
    run.go(2)

    run.wait_ready(4)
    agent.start()  # same socket path, same SSD directory
    run.go(4)
    result = run.result()
    outs = result["outputs"]
    assert [o["cached_tokens"] for o in outs[:2]] == [0, 512]
    # Agent gone: both requests complete, computed locally, with zero hits.
    assert outs[2]["cached_tokens"] == 0
    assert outs[3]["cached_tokens"] == 0
    # Agent back on the same SSD: the client reconnects and hits resume (from SSD).
    assert outs[4]["cached_tokens"] == 512
    for out in (outs[0], outs[1], outs[2], outs[4]):
        assert out["tokens"] == baseline["a"]
    assert outs[3]["tokens"] == baseline["d"]
    counters = result["counters"]
    assert counters["agent_unavailable"] >= 1
    assert counters["async_loads"] >= 1
    assert counters["load_errors"] == 0
