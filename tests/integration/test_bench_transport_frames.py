"""``python -m benchmarks.transport_frames``: the TCP transport alone between two processes,
against the raw socket of the same run; a tiny run reports every connection count, and bad
flags are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.transport_frames import main


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
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
