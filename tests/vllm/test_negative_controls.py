"""Negative controls: damaged bytes are caught, and loaded bytes really feed attention."""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable
from typing import Any

import pytest

from meshkv.chunk import Namespace, chunk_keys
from meshkv.launch import AgentProcess
from tests.vllm.engines import EngineRun, Prompts, damage_payloads, stored_ssd_files, wait_until

pytestmark = pytest.mark.vllm


def test_corrupted_ssd_chunks_are_detected_and_recomputed(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    agent = agents(args=["--write-through"]).start()
    run = engine(
        [prompts.a, prompts.a],
        connector={"socket_path": agent.socket_path, "retry_interval_s": 0.2},
        pause_before=[1],
    )
    run.wait_ready(1)
    with agent.client() as client:
        # Two chunks and the cut of the third (block_hits).
        wait_until(lambda: client.stats()["tiers"]["ssd"]["chunks"] == 3, what="write-through")
    agent.stop()
    damage_payloads(stored_ssd_files(agent, 3))
    agent.start()  # fresh CPU tier: the chunks now exist only as damaged SSD files
    run.go(1)
    result = run.result()
    cold, warm = result["outputs"]
    assert cold["tokens"] == baseline["a"]
    assert warm["tokens"] == baseline["a"]  # recomputed, not garbage
    with agent.client() as client:
        stats = client.stats()
    assert stats["checksum_failures"] + stats["promotion_failures"] >= 1
    counters = result["counters"]
    assert counters["load_errors"] >= 1
    assert counters["loaded_chunks"] == 0


def _overwrite_a_with_c(
    engine: Callable[..., EngineRun],
    agent: AgentProcess,
    prompts: Prompts,
    verify: bool,
) -> dict[str, Any]:
    """Run A, C, then A again after A's first chunk was overwritten in the arena with C's
    (valid KV, wrong place: nothing but a checksum can tell)."""
    run = engine(
        [prompts.a, prompts.c, prompts.a],
        connector={"socket_path": agent.socket_path, "verify_loads": verify},
        pause_before=[2],
    )
    namespace = Namespace(**json.loads(run.wait_ready(2))["scheduler"])
    digest = namespace.digest()
    key_a = chunk_keys(digest, prompts.a, 256)[0]
    key_c = chunk_keys(digest, prompts.c, 256)[0]
    with agent.client(namespace=namespace) as client:
        lease_a, lease_c = client.read([key_a, key_c])
        assert lease_a is not None and lease_c is not None
        try:
            other = bytes(lease_c.view)
            assert other != bytes(lease_a.view)
            fd = os.open(f"/dev/shm/{agent.arena_name}", os.O_RDWR)
            try:
                with mmap.mmap(fd, 0) as arena:
                    arena[lease_a.offset : lease_a.offset + len(other)] = other
            finally:
                os.close(fd)
        finally:
            client.release([lease_a, lease_c])
    run.go(2)
    return run.result()


def test_wrong_but_valid_kv_changes_the_output(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    """The negative control: with verification off, attention reads what we load."""
    result = _overwrite_a_with_c(engine, agents().start(), prompts, verify=False)
    outs = result["outputs"]
    assert outs[0]["tokens"] == baseline["a"]
    assert outs[1]["tokens"] == baseline["c"]
    # A's first chunk now holds C's KV: the engine loads it and its output changes.
    assert outs[2]["cached_tokens"] == 640
    assert outs[2]["tokens"] != baseline["a"]


def test_arena_bytes_changed_after_commit_are_never_served(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    """The same damage with ``verify_loads`` on (the default): detected after the copy,
    recomputed (the output is right), and the agent drops the damaged chunk."""
    agent = agents().start()
    result = _overwrite_a_with_c(engine, agent, prompts, verify=True)
    outs = result["outputs"]
    assert outs[2]["tokens"] == baseline["a"]
    counters = result["counters"]
    assert counters["corrupt_chunks"] == 1
    assert counters["load_errors"] >= 1
    with agent.client() as client:
        wait_until(lambda: client.stats()["checksum_failures"] >= 1, what="agent drops it")
