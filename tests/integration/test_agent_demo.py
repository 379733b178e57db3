"""``python -m meshkv.demo`` (what ``make demo`` runs) works end to end and cleans up."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_and_cleans_up() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshkv.demo"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "prefix=5" in out.stdout
    assert "loaded and verified 5 chunks byte for byte" in out.stdout
    assert "put/get: b'small payload'" in out.stdout
    assert "agent stopped (exit code 0)" in out.stdout
    assert "exported views" not in out.stderr
    arena = re.search(r"arena (meshkv-[0-9a-f-]+)", out.stdout)
    assert arena is not None
    assert not os.path.exists(f"/dev/shm/{arena.group(1)}"), "the demo's arena was left behind"
