"""``python -m benchmarks.demo`` (what ``make demo`` runs) works end to end and cleans up.

The demo starts three real agents and two real vLLM engines, so it is marked ``vllm``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

DEMO_TIMEOUT_S = 280


def _demo_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    return env


def _hits(row: str) -> list[int]:
    """The three hit columns of a summary row (cold, warm, node-b)."""
    cells = row.split()
    return [int(cells[i].replace(",", "")) for i in (5, 8, 11)]


def _leftovers(stdout: str) -> list[str]:
    arenas = re.findall(r"arena (meshkv-[0-9a-f-]+)", stdout)
    workdirs = re.findall(r"(/tmp/meshkv-demo-[a-z0-9_]+)/", stdout)
    assert len(set(arenas)) == 3 and workdirs, stdout
    return [p for p in [f"/dev/shm/{a}" for a in set(arenas)] + workdirs if os.path.exists(p)]


def test_demo_runs_and_cleans_up() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.demo"],
        capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, env=_demo_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "converged: 3 members alive" in text
    rows = [line for line in text.splitlines() if re.match(r"\s*doc \d ", line)]
    assert len(rows) == 3, text
    for row in rows:
        cold, warm, cross = _hits(row)
        assert cold == 0, row
        # Each document (whole chunks) is hit in full: warm on node-a, and through the
        # mesh for the fresh engine on node-b.
        assert warm > 0 and warm == cross, row
    assert "engine 2's first tokens identical to engine 1's: 3/3" in text
    agent_rows = {m.group(1): m.group(2, 3) for m in re.finditer(
        r"^\s*(node-[abc])\s+(\d+)\s+(\d+)\s", text, re.M)}  # fmt: skip
    assert agent_rows["node-a"][1] == "0"  # node-a computed, pulled nothing
    assert int(agent_rows["node-b"][1]) > 0  # node-b pulled the documents from a peer
    assert int(agent_rows["node-c"][1]) > 0
    assert "max/mean ownership" in text  # meshkv ring status
    assert "tier  chunks" in text  # meshkv status
    assert "arenas and files removed" in text
    assert "exported views" not in out.stderr
    assert _leftovers(text) == [], "the demo left arenas or files behind"


def test_demo_cleans_up_after_ctrl_c(tmp_path: Path) -> None:
    """SIGINT while the engine runs: exit 130, agents stopped, nothing left behind."""
    log = tmp_path / "demo.out"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.demo"], stdout=sink, stderr=subprocess.STDOUT,
            text=True, env=_demo_env(),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while "== engine 1" not in log.read_text():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert code == 130, text
    assert "interrupted: cleaning up" in text
    assert _leftovers(text) == [], "the demo left arenas or files behind after Ctrl-C"
