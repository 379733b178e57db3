"""Real vLLM engines reusing KV through a real meshkv agent (in-process engine mode)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshkv.launch import AgentProcess
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
    # Cold: nothing stored yet. Warm: both full chunks of A and the first block of its
    # third chunk, the cut A saved (block_hits; never the whole prompt).
    assert first["cached_tokens"] == 0
    assert second["cached_tokens"] == 640
    # B shares 300 tokens with A: exactly one full 256-token chunk (no cut of B's second
    # chunk was ever saved).
    assert shared["cached_tokens"] == 256
    assert first["tokens"] == baseline["a"]
    assert second["tokens"] == baseline["a"]
    assert shared["tokens"] == baseline["b"]
    counters = result["counters"]
    assert counters["lookups"] == 3
    assert counters["hit_tokens"] == 640 + 256
    assert counters["loaded_chunks"] == 4
    assert counters["load_errors"] == 0
    # A's two chunks and its cut, then B's second chunk (its first is A's; its last 88
    # tokens make no whole block).
    assert counters["saved_chunks"] == 4
    with agent.client() as client:
        assert client.stats()["tiers"]["cpu"]["chunks"] == 4


def test_fresh_consumer_process_loads_what_a_producer_stored(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    """Cross-process reuse and P/D roles: the producer only saves, the consumer only loads."""
    agent = agents().start()
    conn = {"socket_path": agent.socket_path}
    producer = engine([prompts.c, prompts.c], connector=conn, kv_role="kv_producer").result()
    assert [o["cached_tokens"] for o in producer["outputs"]] == [0, 0]
    assert producer["counters"]["lookups"] == 0
    assert producer["counters"]["saved_chunks"] == 3  # two chunks and the cut of the third
    # The producer's process has exited; a fresh consumer process finds its chunks.
    consumer = engine([prompts.c], connector=conn, kv_role="kv_consumer").result()
    (out,) = consumer["outputs"]
    assert out["cached_tokens"] == 640
    assert out["tokens"] == baseline["c"]
    assert consumer["counters"]["loaded_chunks"] == 3
    assert consumer["counters"]["saved_chunks"] == 0


def test_agent_killed_while_serving_then_restarted(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    agent = agents(args=["--write-through"]).start()
    run = engine(
        [prompts.a, prompts.a, prompts.a, prompts.a, prompts.d, prompts.a],
        connector={"socket_path": agent.socket_path, "retry_interval_s": 0.2},
        pause_before=[2, 3, 5],
    )
    run.wait_ready(2)
    with agent.client() as client:
        wait_until(lambda: client.stats()["tiers"]["ssd"]["chunks"] >= 3, what="write-through")
    agent.sigstop()  # hung agent: the socket accepts, nothing answers
    run.go(2)

    run.wait_ready(3)
    agent.sigcont()
    agent.kill()  # SIGKILL: no flush, no goodbye
    run.go(3)

    run.wait_ready(5)
    agent.start()  # same socket path, same SSD directory
    run.go(5)
    result = run.result()
    outs = result["outputs"]
    assert [o["cached_tokens"] for o in outs[:2]] == [0, 640]
    # Agent hung, then gone: requests complete, computed locally, with zero hits.
    assert [o["cached_tokens"] for o in outs[2:5]] == [0, 0, 0]
    assert outs[2]["seconds"] < 15.0  # generous: two cores shared with other engines
    # Agent back on the same SSD: the client reconnects and hits resume (from SSD).
    assert outs[5]["cached_tokens"] == 640
    for i in (0, 1, 2, 3, 5):
        assert outs[i]["tokens"] == baseline["a"]
    assert outs[4]["tokens"] == baseline["d"]
    counters = result["counters"]
    # The hung agent cost the engine its deadlines (lookup 0.2 s, save 0.5 s, each retried
    # at most once per 0.2 s retry interval), not the 30 s of a lease or a TCP timeout.
    assert counters["call_seconds"] < 4.0
    assert counters["agent_unavailable"] >= 1
    # The restarted agent found the chunks on its SSD (loaded inside the step, which
    # waited for their promotion: ``ssd_sync_wait_s``).
    assert agent.metric("meshkv_hit_chunks_total", 'tier="ssd"') >= 1
    assert counters["async_loads"] == 0
    assert counters["load_errors"] == 0


def test_an_agent_restart_costs_the_engine_no_saves(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    """An agent restarted between two requests (an upgrade): the engine's connections to
    the old agent are broken, and the next step's first call is its saves' reserve. It is
    sent again to the new agent, so the step saves its chunks and the agent is never
    marked down (before: the 3 saves were skipped and the breaker opened)."""
    agent = agents().start()
    run = engine(
        [prompts.a, prompts.c, prompts.c], connector={"socket_path": agent.socket_path},
        pause_before=[1],
    )  # fmt: skip
    run.wait_ready(1)
    agent.stop()
    agent.start()  # a new arena, nothing stored
    run.go(1)
    result = run.result()
    assert [o["tokens"] for o in result["outputs"]] == [baseline["a"], baseline["c"], baseline["c"]]
    assert [o["cached_tokens"] for o in result["outputs"]] == [0, 0, 640]
    counters = result["counters"]
    assert counters["save_skipped"] == 0
    assert counters["agent_unavailable"] == 0
    with agent.client() as client:
        assert client.stats()["tiers"]["cpu"]["chunks"] == 3  # C's two chunks and its cut


def test_vllm_prefix_cache_hits_come_first_and_meshkv_loads_the_rest(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    """With vLLM's prefix cache on, the connector loads only blocks vLLM lacks."""
    agent = agents().start()
    sibling = prompts.a[:130] + prompts.d[:300]  # shares exactly one 128-token block with A
    result = engine(
        [prompts.a, sibling, prompts.a],
        connector={"socket_path": agent.socket_path},
        prefix_caching=True,
        reset_prefix_cache_before=[1],
    ).result()
    cold, _, warm = result["outputs"]
    assert cold["cached_tokens"] == 0
    # 128 tokens from vLLM's own cache (the sibling's first block) + 512 loaded by meshkv:
    # the rest of chunk 0 (one block), all of chunk 1 (two blocks) and A's cut of chunk 2
    # (one block).
    assert warm["cached_tokens"] == 640
    assert warm["tokens"] == baseline["a"]
    counters = result["counters"]
    assert counters["hit_tokens"] == 512
    assert counters["loaded_chunks"] == 3
    assert counters["load_errors"] == 0
