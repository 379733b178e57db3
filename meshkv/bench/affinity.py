"""Move running processes between CPU sets for a benchmark, and put them back.

A 2-core machine runs a benchmark's engines and agents on the same cores; on the nodes users
run, an agent has cores of its own. ``Placement`` moves every thread of a process and of its
descendants (an engine is a front end, an engine core and workers) onto a set of CPUs and
restores each thread's own mask afterwards (vLLM binds its OpenMP threads to chosen cores, so
one mask for all would not be "back"). Linux only (``/proc`` and ``os.sched_setaffinity``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path


def supported() -> bool:
    """Whether threads can be moved here and there are at least two CPUs to split."""
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def _parents() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry.name)] = int(fields[1])
    return out


def process_tree(roots: Iterable[int]) -> list[int]:
    """``roots`` and every live descendant of them."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    seen: list[int] = []
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.append(pid)
        stack.extend(children.get(pid, ()))
    return seen


def _threads(pid: int) -> list[int]:
    try:
        return [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return []


class Placement:
    """``move(pids, cpus)`` any number of times, then ``restore()``: every thread moved gets
    its own mask back; a thread started meanwhile gets its process's first mask."""

    def __init__(self) -> None:
        self._saved: dict[int, set[int]] = {}
        self._process_mask: dict[int, set[int]] = {}

    def move(self, pids: Iterable[int], cpus: set[int]) -> None:
        for pid in pids:
            for tid in _threads(pid):
                with contextlib.suppress(OSError):  # the thread ended meanwhile
                    mask = os.sched_getaffinity(tid)
                    self._saved.setdefault(tid, mask)
                    self._process_mask.setdefault(pid, self._saved[tid])
                    os.sched_setaffinity(tid, cpus)

    def restore(self) -> None:
        for pid, first in self._process_mask.items():
            for tid in _threads(pid):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, self._saved.get(tid, first))
        self._saved.clear()
        self._process_mask.clear()
