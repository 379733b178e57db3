"""The simulation scenarios, at full size where it fits the time budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.sim_wall import run_sim_result
from meshkv.mesh.config import MembershipConfig
from simulations import detection, directory_churn, dissemination, faults, partition, scale
from simulations.sim import Sim, run_until_converged, start_cluster

REPO = Path(__file__).resolve().parents[2]


def test_same_seed_gives_a_byte_identical_event_log() -> None:
    a = scale.run(seed=5, n=48, duration_s=120.0)
    b = scale.run(seed=5, n=48, duration_s=120.0)
    c = scale.run(seed=6, n=48, duration_s=120.0)
    assert a["log_sha256"] == b["log_sha256"] and a["events"] == b["events"]
    assert c["log_sha256"] != a["log_sha256"]
    assert a["converged_at_end"] and a["events_by_kind"]["dead"] > 0


@pytest.mark.slow
def test_256_nodes_for_600_simulated_seconds() -> None:
    r = run_sim_result(seed=1, n=256, duration_s=600.0)
    assert r["converged_at_end"]
    assert r["events_by_kind"]["joined"] >= 256 * 255
    # the target is 60 s of wall time on an idle 2-core machine; the shared test machine is
    # often loaded several times over, so assert on the CPU time the run itself used
    assert r["cpu_s"] <= 60.0, r


def test_crash_detected_by_everyone_within_8s_p99() -> None:
    r = detection.run(seed=2, n=64, loss=0.01, crashes=5)
    assert r["min_fraction_declared_dead"] >= 0.99
    assert r["detection_p99_s"] <= 8.0, r
    assert r["false_dead_events"] == 0


def test_update_reaches_999_permille_of_64_nodes_within_1_5s() -> None:
    r = dissemination.run(seed=3, n=64, loss=0.01, trials=20)
    assert r["fraction_within_target"] >= 0.999, r
    assert r["pooled_quantile_s"] is not None and r["pooled_quantile_s"] <= 1.5, r


def test_no_false_dead_in_a_healthy_lossy_cluster() -> None:
    r = faults.run_healthy(seed=4, n=64, loss=0.01, duration_s=180.0)
    assert r["dead_events"] == 0 and r["converged_at_end"]


def test_short_pause_is_refuted_long_pause_is_dead_then_rejoins() -> None:
    r = faults.run_pause(seed=5, n=32, loss=0.01, short_s=2.0, long_s=30.0, short_pauses=5)
    assert r["short_suspected_by"] > 0 and r["short_dead_by"] == 0
    assert r["short_refuted"] and r["short_converged"]
    assert r["long_dead_by_fraction"] >= 0.99
    assert r["rejoined_by_fraction"] == 1.0
    assert r["incarnation_after_rejoin"] > r["incarnation_before_long"]
    assert r["converged_at_end"]


def test_partition_heals_and_views_converge() -> None:
    r = partition.run(seed=6, n=32, loss=0.01, split_s=45.0)
    assert r["cross_pairs_dead_at_heal"] >= 0.9
    assert r["converged"] and r["converge_after_heal_s"] <= 60.0


def test_directory_repairs_after_crashes_and_joins() -> None:
    r = directory_churn.run(seed=2, n=24, loss=0.01, keys_per_node=100, crashes=3, joins=3)
    assert r["accuracy_before"] >= 0.95
    # Dead holders leave the answers within a detection time (~10 s, LAN preset); an
    # announcement lost to the 1% loss is repaired by the next re-announce (30 s period).
    mostly = next(t for t, acc, stale in r["timeline_after_crash"] if acc >= 0.99 and stale == 0)
    assert mostly <= 12.0, r
    assert r["repaired_after_crash_s"] is not None and r["repaired_after_crash_s"] <= 45.0, r
    assert r["accurate_after_join_s"] is not None and r["accurate_after_join_s"] <= 20.0, r
    assert r["final_accuracy"] >= 0.999 and r["final_stale_answers"] == 0


def test_wire_mode_round_trips_every_message_through_msgpack() -> None:
    sim = Sim(seed=7, config=MembershipConfig.LOCAL(), loss=0.02, wire=True)
    names = start_cluster(sim, 8)
    assert run_until_converged(sim, limit=20.0) is not None
    sim.crash(names[3], sim.now)
    sim.run(sim.now + 10.0)
    assert sim.converged(set(names) - {names[3]})


def test_scenario_script_runs_from_the_command_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "simulations.dissemination", "--seed", "2", "--out"]
    proc = subprocess.run(
        [*cmd, str(tmp_path), "--trials", "2", "--n", "16"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fraction_within_target" in proc.stdout
    data = json.loads((tmp_path / "dissemination.json").read_text())
    assert data["n"] == 16 and data["trials"] == 2 and data["fraction_within_target"] > 0.9
