"""``python -m benchmarks.transport_frames``: the TCP transport alone between two processes,
against the raw socket of the same run; a tiny run reports every connection count, and bad
flags are refused by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.transport_frames import main
from meshkv.bench.transport_baselines import RawTcpRounds
from tests.helpers.cli import assert_refused


def test_a_tiny_run_reports_each_connection_count_against_the_raw_socket(
    tmp_path: Path,
) -> None:
    out = tmp_path / "frames.json"
    argv = ["--chunk-mib", "1", "--chunks", "3", "--rounds", "2", "--connections", "1,2",
            "--gap-ms", "5", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    results = {r["name"]: r for r in report["results"]}
    assert sorted(results) == ["frames_1conn", "frames_2conn"]
    for r in results.values():
        assert r["size_bytes"] == 1 << 20 and r["value"] > 0
        assert r["baseline"] == "raw_tcp_blocking" and r["baseline_value"] > 0
    assert report["meta"]["gap_ms"] == 5 and report["meta"]["chunks"] == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--connections", "x"], "--connections must be whole numbers"),
        (["--connections", "0"], "must be positive"),
        (["--chunks", "0"], "must be positive"),
        (["--chunk-mib", "-2"], "must be positive"),
        (["--gap-ms", "-1"], "--gap-ms must be between 0 and 10000"),
    ],
)
def test_bad_flags_are_refused_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_refused(main, argv, message, capsys)


def _raw_servers() -> int:
    """This process's children serving the raw TCP baseline."""
    me, count = os.getpid(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me and b"serve-raw-tcp" in cmdline:
            count += 1
    return count


def test_raw_rounds_keep_one_server_per_size_for_the_whole_run() -> None:
    """The raw baseline of interleaved rounds keeps its server and connection (a server
    started before every round slowed the measured side's round after it)."""
    raw = RawTcpRounds()
    try:
        rates = [raw(1 << 20, 3) for _ in range(3)]
        assert min(rates) > 0 and _raw_servers() == 1
        assert raw(1 << 16, 2) > 0 and _raw_servers() == 2
    finally:
        raw.close()
    assert _raw_servers() == 0


def test_the_internal_server_command_refuses_bad_arguments(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESHKV_FRAMES_SECRET", raising=False)
    for argv in (["serve"], ["serve", "x"], ["serve", "1024"]):
        assert main(argv) == 2
        assert "started by the benchmark itself" in capsys.readouterr().err
    monkeypatch.setenv("MESHKV_FRAMES_SECRET", "zz" * 16)  # not hex: no traceback either
    assert main(["serve", "1024"]) == 2
    assert "started by the benchmark itself" in capsys.readouterr().err
