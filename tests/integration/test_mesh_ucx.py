"""Peer pulls over the UCX transport (ucxx) between two real agents."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from meshkv.launch import AgentProcess
from tests.helpers.mesh import (
    metric,
    read_verified,
    start_mesh,
    wait_converged,
    wait_for,
    write_secret,
)

pytestmark = pytest.mark.ucx

pytest.importorskip("ucxx", reason="the ucx extra (ucxx-cu12) is not installed")


def test_pull_over_ucx(agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> None:
    agents = start_mesh(
        agent_factory, 2, write_secret(tmp_path), transport="ucx", cpu_bytes=128 << 20
    )
    wait_converged(agents)
    a, b = agents
    payloads = {os.urandom(16): os.urandom(4 << 20) for _ in range(4)}
    with a.client() as ca:
        for key, data in payloads.items():
            assert ca.put(key, data)
    keys = list(payloads)
    with b.client() as cb:
        wait_for("holders announced over UCX", lambda: cb.lookup(keys).prefix == len(keys))
        read_verified(b, cb, payloads, wait=10.0)
    assert metric(b, "meshkv_peer_pull_bytes_total") == 4 * (4 << 20)
    status = b.get_json("/v1/status")["mesh"]
    assert status["transport"] == "ucx"
