"""Meshes of real ``meshkv agent`` processes on loopback, for the mesh tests and benches."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from meshkv.client import AgentClient
from meshkv.launch import AgentProcess, mesh_args, write_secret  # noqa: F401 (re-exported)

CONVERGE_TIMEOUT_S = 20.0


def peer_address(agent: AgentProcess) -> str:
    """The agent's peer address (the real port when it listened on port 0)."""
    return str(agent.get_json("/v1/status")["mesh"]["address"])


def start_mesh(
    factory: Callable[..., AgentProcess],
    n: int,
    secret: Path,
    *,
    names: list[str] | None = None,
    cpu_bytes: int = 64 << 20,
    **kwargs: Any,
) -> list[AgentProcess]:
    """Start ``n`` agents, the first alone and the others joining through it."""
    names = names or [chr(ord("a") + i) for i in range(n)]
    first = factory(name=names[0], cpu_bytes=cpu_bytes, args=mesh_args(secret, **kwargs)).start()
    seed = peer_address(first)
    rest = [
        factory(name=name, cpu_bytes=cpu_bytes, args=mesh_args(secret, join=[seed], **kwargs))
        for name in names[1:]
    ]
    with ThreadPoolExecutor(max(1, len(rest))) as pool:  # start-up is mostly imports
        list(pool.map(lambda agent: agent.start(), rest))
    return [first, *rest]


def ring(agent: AgentProcess, stats: bool = False) -> dict[str, Any]:
    """``/v1/ring`` (without members' chunk numbers unless ``stats``: quick to poll)."""
    return dict(agent.get_json("/v1/ring" if stats else "/v1/ring?stats=0"))


def states(agent: AgentProcess) -> dict[str, str]:
    return {m["id"]: m["state"] for m in ring(agent)["members"]}


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = CONVERGE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, urllib.error.URLError, KeyError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def converged(agents: list[AgentProcess], alive: set[str]) -> bool:
    """Every agent sees exactly ``alive`` as its live members, with one ring digest."""
    digests = set()
    for agent in agents:
        view = ring(agent)
        live = {m["id"] for m in view["members"] if m["state"] == "alive"}
        if live != alive:
            return False
        digests.add(view["ring"]["digest"])
    return len(digests) == 1


def wait_converged(agents: list[AgentProcess], timeout: float = CONVERGE_TIMEOUT_S) -> None:
    alive = {a.name for a in agents}
    wait_for(f"{sorted(alive)} to converge", lambda: converged(agents, alive), timeout)


def ring_status_json(agent: AgentProcess) -> dict[str, Any]:
    """``meshkv ring status --json`` run as a real CLI process."""
    out = subprocess.run(
        [sys.executable, "-m", "meshkv", "ring", "status", "--json", "--http", agent.http],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def metric(agent: AgentProcess, name: str, labels: str = "") -> float:
    """Sum of a Prometheus sample from ``/metrics`` (0.0 when absent)."""
    return agent.metric(name, labels)


def read_verified(
    agent: AgentProcess, client: AgentClient, payloads: dict[bytes, bytes], wait: float
) -> None:
    """Read every key of ``payloads`` through ``client`` (waiting up to ``wait`` seconds
    for pulls and fetches), check each chunk's bytes, and release the leases."""
    leases = client.read(list(payloads), wait=wait)
    try:
        assert all(x is not None for x in leases), agent.log()[-4000:]
        for lease in leases:
            assert lease is not None and bytes(lease.view) == payloads[lease.key]
    finally:
        client.release([x for x in leases if x is not None])
