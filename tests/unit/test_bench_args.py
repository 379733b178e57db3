"""``meshkv bench``'s flags: a value that would divide by zero, loop forever or mean nothing
minutes into a run stops the command at parse time, naming the flag (exit 2). And the
scratch directory of a run that starts processes goes away when the run passes."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from meshkv.bench.scratch import run_in_scratch
from meshkv.cli.main import build_parser, main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["local", "--lookups", "0"], "argument --lookups: expected a positive integer, got '0'"),
        (["local", "--cpu-gb", "nan"], "argument --cpu-gb: expected a positive number"),
        (["local", "--batch-mib", "-4"], "argument --batch-mib: expected a positive integer"),
        (["mesh", "--chunks", "0"], "argument --chunks: expected a positive integer"),
        (["mesh", "--rounds", "x"], "argument --rounds: expected a positive integer, got 'x'"),
        (["kernels", "--threads", "-1"], "argument --threads: expected an integer >= 0"),
        (["kernels", "--repeats", "0"], "argument --repeats: expected a positive integer"),
        (["pd", "--model", "m", "--prompt-tokens", "abc"], "argument --prompt-tokens: expected"),
        (["pd", "--model", "m", "--output-tokens", "9-3"], "expected 0 < LOW <= HIGH, got '9-3'"),
        (["pd", "--model", "m", "--requests", "0"], "argument --requests: expected a positive"),
        (["serve", "--model", "m", "--doc-tokens", "0-5"], "argument --doc-tokens: expected 0 <"),
        (["serve", "--model", "m", "--arms", "nope"], "argument --arms: expected a comma-sep"),
        (["route", "--model", "m", "--engines", "0"], "argument --engines: expected a positive"),
        (["serve", "--model", "/proc/mkv-none"], "argument --model: /proc/mkv-none is not a model"),
        (["pd", "--model", "/etc"], "argument --model: /etc is not a model directory (no config"),
    ],
)  # fmt: skip
def test_a_bad_bench_flag_stops_at_parse_time(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"meshkv bench {argv[0]}: error: " in err and message in err, err


def test_ranges_and_defaults_parse_to_numbers() -> None:
    args = build_parser().parse_args(["bench", "pd", "--model", "m", "--prompt-tokens", "300"])
    assert args.prompt_tokens == (300, 300) and args.output_tokens == (32, 64)
    args = build_parser().parse_args(["bench", "serve", "--model", "m"])
    assert args.doc_tokens == (3000, 4000)


def test_bench_local_refuses_an_ssd_dir_that_is_not_there(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before anything starts (the bench used to create the directory, wherever it was)."""
    assert main(["bench", "local", "--ssd-dir", "/proc/mkv-none", "--only", "ssd"]) == 2
    assert "--ssd-dir /proc/mkv-none is not a directory" in capsys.readouterr().err


def test_a_benchmark_s_scratch_directory_is_removed_when_it_passes_and_kept_when_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Path] = []

    def bench(rc: int) -> Callable[[argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            seen.append(Path(args.workdir))
            (Path(args.workdir) / "agent.log").write_text("log")
            return rc

        return run

    args = argparse.Namespace(workdir=None)
    assert run_in_scratch(bench(0), args, prefix="mkv-t-", command="meshkv bench t") == 0
    assert not seen[-1].exists() and args.workdir is None
    assert run_in_scratch(bench(1), args, prefix="mkv-t-", command="meshkv bench t") == 1
    kept = seen[-1]
    assert (kept / "agent.log").is_file()
    assert f"meshkv bench t: the run did not pass; its logs are kept in {kept}" in (
        capsys.readouterr().err
    )
    shutil.rmtree(kept)
    given = argparse.Namespace(workdir=str(tmp_path / "mine"))
    (tmp_path / "mine").mkdir()
    assert run_in_scratch(bench(0), given, prefix="mkv-t-", command="meshkv bench t") == 0
    assert (tmp_path / "mine" / "agent.log").is_file()  # the caller's: kept
    a_file = argparse.Namespace(workdir=str(tmp_path / "mine" / "agent.log"))
    assert run_in_scratch(bench(0), a_file, prefix="mkv-t-", command="meshkv bench t") == 2
    assert "--workdir " + a_file.workdir + " exists and is not a directory" in (
        capsys.readouterr().err
    )

    def crashes(args: argparse.Namespace) -> int:
        seen.append(Path(args.workdir))
        (Path(args.workdir) / "agent.log").write_text("log")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_in_scratch(crashes, argparse.Namespace(workdir=None), prefix="mkv-t-", command="c")
    assert (seen[-1] / "agent.log").is_file()  # a crash keeps its logs too
    shutil.rmtree(seen[-1])
