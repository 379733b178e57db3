"""The short soak (``meshkv bench soak --minutes 1.75 --churn-s 10``): three real agents in a mesh,
clients storing, reading (peer pulls, SSD promotions), abandoning reservations and leases
and dropping connections, while the two other agents are killed and restarted. At the end
the steady agent shows no growth in descriptors or tasks (its heap: no runaway), no agent
holds a lease, reservation or fenced slot, and no read returned a wrong byte. ``make soak``
runs 30 minutes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshkv.bench import soak

pytestmark = pytest.mark.slow


def test_short_soak_leaks_nothing(tmp_path: Path) -> None:
    # 105 s with a restart every 10 s: about seven restarts after the baseline (26 s), so a leak
    # of one descriptor or task per restart exceeds the slack of 4 (the 3-minute version
    # this replaced restarted every 25 s: five). ``make soak`` runs 30 minutes.
    out = tmp_path / "soak.json"
    code = soak.main(
        ["--minutes", "1.75", "--churn-s", "10", "--json", str(out), "--workdir", str(tmp_path)]
    )
    report = json.loads(out.read_text())
    checks = {c["name"]: c for c in report["meta"]["checks"]}
    # The heap is held to "no runaway" only: in 2 minutes it is still warming up (SSD
    # index, directory, allocator high-water marks: the 30-minute run rises ~3 MiB over its
    # first 4 minutes, then stays flat), so the 5 % limit belongs to ``make soak``. The
    # leak this check found (dead connections in reference cycles, ~2.6 MiB a minute) has
    # its own exact test: test_transport_tcp.py::test_a_lost_connection_is_freed_...
    rss = checks.pop("rss_anon_growth")
    assert rss["value"] < 0.5, rss
    failed = {n: c for n, c in checks.items() if not c["ok"]}
    assert not failed, failed
    tally = report["meta"]["tally"]
    # The load really ran: stores, verified reads (many from peers), abandoned work, churn.
    assert tally["stores"] > 500 and tally["read_hits"] > 500, tally
    assert tally["abandoned"] > 0 and report["meta"]["churned"] >= 6, report["meta"]
    assert code == (0 if rss["ok"] else 1)
    last = report["meta"]["samples"][-1]
    assert last["cpu_chunks"] > 0 and last["directory_keys"] > 0, last
    slope = next(r for r in report["results"] if r["name"] == "rss_anon_slope")
    assert slope["unit"] == "MiB/h" and abs(slope["value"]) < 1e4, slope


def test_the_memory_trend_is_a_least_squares_slope_per_hour() -> None:
    rising = [{"t": t, "rss": 1000.0 + 2.0 * t} for t in (0, 5, 10, 15, 20)]
    assert soak.slope_per_hour(rising, "rss", since=0) == pytest.approx(7200.0)
    noisy = [{"t": 0, "rss": 10.0}, {"t": 5, "rss": 12.0}, {"t": 10, "rss": 10.0},
             {"t": 15, "rss": 12.0}]  # fmt: skip
    assert soak.slope_per_hour(noisy, "rss", since=0) == pytest.approx(0.08 * 3600)
    # only the samples from ``since`` on count: a warm-up climb is not a trend
    warm_then_flat = [{"t": 0, "rss": 0.0}, {"t": 5, "rss": 500.0}, {"t": 10, "rss": 500.0},
                      {"t": 15, "rss": 500.0}]  # fmt: skip
    assert soak.slope_per_hour(warm_then_flat, "rss", since=10) == 0.0
    assert soak.slope_per_hour(warm_then_flat[:1], "rss", since=0) == 0.0
