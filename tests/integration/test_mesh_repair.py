"""Re-replication: copies lost with a dead holder are made again on the new ring owners."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from meshkv.launch import AgentProcess
from tests.helpers.mesh import metric, start_mesh, states, wait_converged, wait_for, write_secret


def _held(agent: AgentProcess) -> int:
    with agent.client() as c:
        return int(c.stats()["tiers"]["cpu"]["chunks"])


def test_three_holders_die_one_at_a_time_and_no_chunk_is_lost(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """The case from the field: replicas 2, four agents, 24 chunks put through one of them,
    then three agents die one at a time. Before repair, 16 of the 24 were gone from the
    survivor; every death must now be followed by copies on the new owners."""
    agents = start_mesh(agent_factory, 4, write_secret(tmp_path), replicas=2, cpu_bytes=256 << 20)
    wait_converged(agents)
    a, b, c, d = agents
    payloads = {os.urandom(16): os.urandom(1 << 20) for _ in range(24)}
    with a.client() as ca:
        for key, data in payloads.items():
            assert ca.put(key, data)
    wait_for("two copies of everything", lambda: sum(_held(x) for x in agents) == 48, 20.0)
    alive = list(agents)
    for victim in (a, b, c):
        victim.kill()
        alive.remove(victim)
        wait_for(
            f"{victim.name} declared dead",
            lambda v=victim: all(states(x).get(v.name) in ("dead", None) for x in alive),
            20.0,
        )
        # each chunk again has min(2, survivors) copies among the survivors
        want = len(payloads) * min(2, len(alive))
        wait_for(
            f"copies restored after {victim.name}",
            lambda w=want: sum(_held(x) for x in alive) >= w,  # type: ignore[misc]
            30.0,
        )
    assert alive == [d]
    with d.client() as cd:
        leases = cd.read(list(payloads))
        try:
            got = {x.key: bytes(x.view) for x in leases if x is not None}
        finally:
            cd.release([x for x in leases if x is not None])
    assert got == payloads  # all 24, byte for byte
    assert metric(d, "meshkv_mesh_repairs_total") > 0
