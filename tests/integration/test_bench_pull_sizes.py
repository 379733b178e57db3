"""``python -m benchmarks.pull_sizes`` on two real agents: a tiny run reports every size's
pull rate against the raw socket of the same run, and bad flags are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.pull_sizes import main
from tests.helpers.cli import assert_refused


def test_a_tiny_run_reports_each_size_against_the_raw_socket(tmp_path: Path) -> None:
    out = tmp_path / "pulls.json"
    argv = ["--sizes", "1,2", "--bytes-mib", "4", "--rounds", "1", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    results = {r["name"]: r for r in report["results"]}
    assert sorted(results) == ["pull_1mib", "pull_2mib"]
    for size in (1, 2):
        r = results[f"pull_{size}mib"]
        assert r["size_bytes"] == size << 20 and r["value"] > 0
        assert r["baseline"] == "raw_tcp_blocking" and r["baseline_value"] > 0
        assert report["meta"][f"chunks_per_round_{size}mib"] == 4 // size


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sizes", "x"], "--sizes must be whole MiB"),
        (["--sizes", "0"], "must be positive"),
        (["--rounds", "0"], "must be positive"),
        (["--bytes-mib", "-1"], "must be positive"),
    ],
)
def test_bad_flags_are_refused_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_refused(main, argv, message, capsys)
