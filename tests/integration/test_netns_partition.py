"""A real network partition between two halves of a mesh, made with network namespaces.

Topology (names carry this process's pid, so parallel runs do not collide)::

    netns L: agents a, b on 10.77.0.1 ──veth (mesh link)── 10.77.0.2: agents c, d in netns R
             admin 10.78.1.2 ──veth── 10.78.1.1 (test)      admin 10.78.2.2 ──veth── 10.78.2.1

The mesh link is cut with ``ip link set … down`` (``tc netem`` is not available here) while
the admin links stay up, so the test can watch both halves during the partition.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshkv.bench.faultkit import NetnsAgent, ip
from meshkv.launch import AgentProcess, LaunchError
from tests.helpers.mesh import mesh_args, peer_address, wait_converged, wait_for, write_secret

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SUFFIX = f"{os.getpid() % 100000}"
NS_L, NS_R = f"mkvL{SUFFIX}", f"mkvR{SUFFIX}"
MESH_L, MESH_R = f"mkml{SUFFIX}", f"mkmr{SUFFIX}"  # <= 15 characters
ADM_L, ADM_L_ROOT = f"mkal{SUFFIX}", f"mkaL{SUFFIX}"
ADM_R, ADM_R_ROOT = f"mkar{SUFFIX}", f"mkaR{SUFFIX}"


@pytest.fixture
def netns() -> Iterator[None]:
    try:
        ip("netns", "add", NS_L)
    except LaunchError as exc:
        print(f"SKIP reason: the kernel refuses network namespaces here: {exc}")
        pytest.skip(f"network namespaces unavailable: {exc}")
    try:
        ip("netns", "add", NS_R)
        ip("link", "add", MESH_L, "netns", NS_L, "type", "veth", "peer", MESH_R, "netns", NS_R)
        ip("-n", NS_L, "addr", "add", "10.77.0.1/24", "dev", MESH_L)
        ip("-n", NS_R, "addr", "add", "10.77.0.2/24", "dev", MESH_R)
        for ns, adm, root, net in ((NS_L, ADM_L, ADM_L_ROOT, 1), (NS_R, ADM_R, ADM_R_ROOT, 2)):
            ip("link", "add", root, "type", "veth", "peer", adm, "netns", ns)
            ip("addr", "add", f"10.78.{net}.1/30", "dev", root)
            ip("-n", ns, "addr", "add", f"10.78.{net}.2/30", "dev", adm)
            ip("link", "set", root, "up")
            ip("-n", ns, "link", "set", adm, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", NS_L, "link", "set", MESH_L, "up")
        ip("-n", NS_R, "link", "set", MESH_R, "up")
        yield
    finally:
        for root in (ADM_L_ROOT, ADM_R_ROOT):
            subprocess.run(["ip", "link", "del", root], capture_output=True, timeout=10)
        for ns in (NS_L, NS_R):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _live(agent: AgentProcess) -> set[str]:
    return {m["id"] for m in agent.get_json("/v1/ring?stats=0")["members"] if m["state"] == "alive"}


def _serve(owner: AgentProcess, reader: AgentProcess, key: bytes, data: bytes) -> None:
    with reader.client() as client:
        wait_for(f"{reader.name} to find {key.hex()[:8]}", lambda: client.lookup([key]).prefix == 1)
        (lease,) = client.read([key], wait=5.0)
        assert lease is not None, reader.log()[-3000:]
        try:
            assert bytes(lease.view) == data
        finally:
            client.release([lease])


def test_partition_both_sides_serve_then_converge(
    netns: None, tmp_path: Path, agent_factory: Callable[..., AgentProcess]
) -> None:
    secret = write_secret(tmp_path)
    made: list[AgentProcess] = []

    def start(name: str, ns: str, ip: str, admin: str, join: list[str]) -> AgentProcess:
        agent = NetnsAgent(
            name=name, netns=ns, admin_ip=admin, args=mesh_args(secret, listen=f"{ip}:0", join=join)
        )
        made.append(agent)
        return agent.start()

    try:
        a = start("a", NS_L, "10.77.0.1", "10.78.1.2", [])
        seed = [peer_address(a)]
        b = start("b", NS_L, "10.77.0.1", "10.78.1.2", seed)
        c = start("c", NS_R, "10.77.0.2", "10.78.2.2", seed)
        d = start("d", NS_R, "10.77.0.2", "10.78.2.2", seed)
        everyone = [a, b, c, d]
        wait_converged(everyone)
        left_key, right_key = os.urandom(16), os.urandom(16)
        left_data, right_data = os.urandom(1 << 20), os.urandom(1 << 20)
        with a.client() as ca:
            assert ca.put(left_key, left_data)
        with c.client() as cc:
            assert cc.put(right_key, right_data)

        ip("-n", NS_L, "link", "set", MESH_L, "down")  # cut
        try:
            wait_for("left half alone", lambda: _live(a) == _live(b) == {"a", "b"}, 20.0)
            wait_for("right half alone", lambda: _live(c) == _live(d) == {"c", "d"}, 20.0)
            # each half keeps serving its own chunks (homes moved into the half)
            _serve(a, b, left_key, left_data)
            _serve(c, d, right_key, right_data)
        finally:
            ip("-n", NS_L, "link", "set", MESH_L, "up")  # heal

        wait_converged(everyone, timeout=30.0)
        digests = {x.get_json("/v1/ring?stats=0")["ring"]["digest"] for x in everyone}
        assert len(digests) == 1
        # after healing, chunks cross the former partition again
        _serve(c, b, right_key, right_data)
        _serve(a, d, left_key, left_data)
    finally:
        for agent in made:
            agent.cleanup()
