"""The traffic simulator: workload streams, the designs side by side, faults, the oracle."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from simulations.traffic import Cluster, ClusterConfig, CostModel, belady
from simulations.traffic_runs import fault_events, main, simulate
from simulations.workloads import CHUNK_TOKENS, Prompt, Workload, WorkloadConfig

SMALL = ClusterConfig(cpu_chunks=16, ssd_chunks=48, reannounce_s=60.0)
CHAT = WorkloadConfig(kind="chat", sessions_per_node_hour=60.0)


def _rates(r: dict) -> dict[str, float]:
    return {d: v["token_hit_rate"] for d, v in r["designs"].items()}


def test_prompt_keys_are_prefix_chained_and_shared_segments_share_chunks() -> None:
    a, b = Prompt(), Prompt()
    for p in (a, b):
        p.append(1, 600)  # the same system prompt
    a.append(7, 300)
    b.append(8, 300)
    assert a.tokens == b.tokens == 900
    assert len(a.keys) == len(b.keys) == 3
    assert a.keys[:2] == b.keys[:2]  # the two full chunks inside the shared segment
    assert a.keys[2] != b.keys[2]  # the chunk that covers different tokens
    longer = a.copy()
    longer.append(9, 1000)
    assert longer.keys[:3] == a.keys  # a chat's next round extends the same chain


def test_chat_rounds_extend_the_previous_rounds_prompt() -> None:
    by_session: dict[int, list[tuple[bytes, ...]]] = {}
    for req in Workload(CHAT, 4, seed=3).requests(1800.0):
        assert req.prompt_tokens // CHUNK_TOKENS == len(req.keys)
        by_session.setdefault(req.session, []).append(req.keys)
    multi = [rounds for rounds in by_session.values() if len(rounds) > 1]
    assert multi, "no session had a second round"
    for rounds in multi:
        for prev, cur in zip(rounds, rounds[1:], strict=False):
            assert cur[: len(prev)] == prev


def test_workload_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="chat, rag, agent or mix"):
        WorkloadConfig(kind="batch")


def test_same_seed_same_results_other_seed_other_results() -> None:
    runs = [simulate(8, CHAT, "round_robin", 900.0, SMALL, seed=s) for s in (5, 5, 6)]
    for r in runs:
        r.pop("wall_s")
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_round_robin_mesh_shares_what_no_sharing_recomputes() -> None:
    r = simulate(16, CHAT, "round_robin", 1800.0, SMALL, seed=1)
    rates = _rates(r)
    mesh, solo = r["designs"]["mesh"], r["designs"]["no_sharing"]
    assert mesh["hit_rate_by_tier"]["peer"] > 0.3
    assert rates["mesh"] >= 2 * rates["no_sharing"]
    assert solo["bytes_moved"] == 0 and mesh["bytes_moved"] > 0
    # nothing beats one cache of the same total size by more than rounding
    assert rates["mesh"] <= rates["oracle_lru"] + 1e-9
    assert rates["oracle_belady"] >= rates["oracle_lru"] - 0.01


def test_sticky_routing_needs_almost_no_peer_hits() -> None:
    r = simulate(16, CHAT, "sticky", 1800.0, SMALL, seed=1)
    mesh = r["designs"]["mesh"]
    # every round of a session meets its own node: the local tiers serve it
    assert mesh["hit_rate_by_tier"]["peer"] < 0.25 * mesh["token_hit_rate"]
    assert r["designs"]["no_sharing"]["token_hit_rate"] > 0.5 * mesh["token_hit_rate"]


def test_slow_links_make_the_mesh_compute_instead_of_pulling() -> None:
    slow = CostModel(link_bytes_per_s=1e9 / 8)  # 1 Gb/s: a chunk pulls slower than it computes
    r = simulate(8, CHAT, "round_robin", 900.0, SMALL, slow, seed=1)
    mesh = r["designs"]["mesh"]
    assert mesh["hit_rate_by_tier"]["peer"] == 0.0
    assert mesh["pulls_refused_as_slower"] > 0


def test_central_directory_down_loses_peer_hits_the_mesh_keeps() -> None:
    evs = fault_events("central_down", 16, 3600.0, 1, SMALL.detect_s)
    r = simulate(16, CHAT, "round_robin", 3600.0, SMALL, seed=1, events=evs)
    central = r["designs"]["central"]["timeline"]
    mesh = r["designs"]["mesh"]["timeline"]
    during = [str(m) for m in range(21, 25)]  # down from minute 20 to 25
    assert sum(central[m] for m in during) < 0.7 * sum(mesh[m] for m in during)


def test_crashed_holders_are_purged_and_a_restarted_node_gets_its_entries() -> None:
    cl = Cluster(8, SMALL, CostModel(), seed=1)
    for req in Workload(CHAT, 8, seed=1).requests(600.0):
        cl.serve(req, cl.names[req.session % 8])
    cl.advance(605.0)
    victim = cl.names[3]
    held = set(cl.mesh[victim].store.cpu.slot_of) | set(cl.mesh[victim].store.ssd.slot_of)
    assert held
    cl.crash([victim])
    cl.update_views()
    for n in cl.names:
        if n != victim:
            answers = cl.mesh[n].directory.answer_lookup(list(held), cl.now)
            assert all(victim not in a for a in answers)
    cl.restart(victim)
    cl.update_views()
    cl.advance(cl.now + 2 * SMALL.tick_s)
    assert cl.mesh[victim].directory.num_entries > 0  # handed off by the previous homes


def test_belady_on_a_hand_made_trace() -> None:
    a, b, c = (bytes([i]) * 16 for i in (1, 2, 3))
    t = CHUNK_TOKENS
    # capacity 1: A, B, A — Belady keeps A (needed again) and bypasses B
    trace = [((a,), 1, t + 1), ((b,), 1, t + 1), ((a,), 1, t + 1)]
    assert belady(trace, 1)["token_hit_rate"] == pytest.approx(t / (3 * (t + 1)), abs=1e-4)
    trace = [((a, b), 2, 2 * t + 1), ((c,), 1, t + 1), ((a, b), 2, 2 * t + 1)]
    assert belady(trace, 2)["token_hit_rate"] == pytest.approx(2 * t / (5 * t + 3), abs=1e-4)


def test_fault_schedule_names_unknown_faults() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        fault_events("meteor", 16, 3600.0, 1, 5.0)


def test_runner_writes_json_and_plot(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import simulations.traffic_runs as runs

    def tiny(seed: int) -> dict:
        res = simulate(8, CHAT, "random", 600.0, replace(SMALL, belady=False), seed=seed)
        res["link_gbps"] = 100
        return {"runs": [res]}

    monkeypatch.setitem(runs.SCENARIOS, "bandwidth", tiny)
    assert main(["--only", "bandwidth", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results" / "traffic_bandwidth.json").read_text())
    assert data["runs"][0]["designs"]["mesh"]["requests"] > 0
    assert (tmp_path / "traffic_bandwidth.png").stat().st_size > 1000
