"""``meshkv.bench.affinity``: moving a real process tree between CPUs and back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshkv.bench import affinity

pytestmark = pytest.mark.skipif(not affinity.supported(), reason="needs Linux and 2+ CPUs")

# A parent with a thread of its own mask and a child process: what an engine looks like.
CHILD = """
import os, subprocess, sys, threading, time
cpus = sorted(os.sched_getaffinity(0))
ready = threading.Event()
def pinned():
    os.sched_setaffinity(0, {cpus[-1]})  # a thread bound to one core, as vLLM's OpenMP ones
    ready.set()
    time.sleep(60)
threading.Thread(target=pinned, daemon=True).start()
ready.wait()
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(grandchild.pid, flush=True)
time.sleep(60)
"""


def _masks(pid: int) -> dict[int, set[int]]:
    return {
        int(t.name): os.sched_getaffinity(int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()
    }


def test_a_tree_is_moved_and_every_thread_gets_its_own_mask_back() -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        grandchild = int(proc.stdout.readline())
        tree = affinity.process_tree([proc.pid])
        assert set(tree) == {proc.pid, grandchild}
        before = {pid: _masks(pid) for pid in tree}
        cpus = sorted(os.sched_getaffinity(0))
        assert any(m == {cpus[-1]} for m in before[proc.pid].values())  # the pinned thread
        assert any(m == set(cpus) for m in before[proc.pid].values())

        placement = affinity.Placement()
        placement.move(tree, {cpus[0]})
        for pid in tree:
            assert all(m == {cpus[0]} for m in _masks(pid).values()), pid
        placement.move(tree, {cpus[1]})  # moved twice: restore still goes to the first masks
        placement.restore()
        assert {pid: _masks(pid) for pid in tree} == before
    finally:
        for pid in affinity.process_tree([proc.pid])[1:]:
            os.kill(pid, 9)
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_process_that_ended_meanwhile_is_skipped() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    placement = affinity.Placement()
    placement.move([proc.pid], {sorted(os.sched_getaffinity(0))[0]})
    proc.wait()
    time.sleep(0.05)
    placement.restore()  # no error for the thread that is gone
    placement.move([proc.pid], {0})  # nor for moving it
    assert affinity.process_tree([proc.pid]) in ([proc.pid], [])
