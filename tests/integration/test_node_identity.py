"""Node identity: unique ids by default, and a second agent with a taken id is refused."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

from meshkv.cli.agent_cmd import default_node_id
from meshkv.cli.ring_cmd import render_status
from meshkv.launch import AgentProcess, LaunchError, free_port
from meshkv.mesh.options import MeshNodeConfig
from tests.helpers.mesh import mesh_args, peer_address, ring, wait_for, write_secret


def test_default_node_id_is_host_and_peer_port() -> None:
    def cfg(listen: str, advertise: str | None = None) -> MeshNodeConfig:
        return MeshNodeConfig(listen=listen, secret=b"s" * 32, advertise=advertise)

    assert default_node_id("gpu7", None, 42) == "gpu7"
    assert default_node_id("gpu7", cfg("0.0.0.0:7946"), 42) == "gpu7-7946"
    assert default_node_id("gpu7", cfg("0.0.0.0:7946", "10.0.0.7:9000"), 42) == "gpu7-9000"
    assert default_node_id("gpu7", cfg("127.0.0.1:0"), 42) == "gpu7-p42"


def test_agents_on_one_host_without_node_ids_form_one_mesh(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    secret = write_secret(tmp_path)
    ports = [free_port() for _ in range(3)]
    first = agent_factory(
        name="d0", default_id=True, args=mesh_args(secret, listen=f"127.0.0.1:{ports[0]}")
    ).start()
    seed = peer_address(first)
    rest = [
        agent_factory(
            name=f"d{i}",
            default_id=True,
            args=mesh_args(secret, listen=f"127.0.0.1:{ports[i]}", join=[seed]),
        ).start()
        for i in (1, 2)
    ]
    host = socket.gethostname()
    want = {f"{host}-{p}" for p in ports}

    def meshed() -> bool:
        return all(
            {m["id"] for m in ring(a)["members"] if m["state"] == "alive"} == want
            for a in [first, *rest]
        )

    wait_for("three default-named agents to see each other", meshed)


def refused(agent: AgentProcess, timeout: float = 20.0) -> int | None:
    """Start ``agent`` (it may refuse before or after it reports ready) and return its exit
    status once it has exited (None if it is still running after ``timeout``)."""
    with contextlib.suppress(LaunchError):
        agent.start()
    assert agent.proc is not None
    deadline = time.monotonic() + timeout
    while agent.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return agent.proc.poll()


def test_second_agent_with_a_taken_id_is_refused_and_the_first_keeps_serving(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    secret = write_secret(tmp_path)
    first = agent_factory(name="twin-a", node_id="twin", args=mesh_args(secret)).start()
    seed = peer_address(first)
    second = agent_factory(name="twin-b", node_id="twin", args=mesh_args(secret, join=[seed]))
    assert refused(second) == 1, second.log()
    log = second.log()
    assert "node id 'twin'" in log and "already in use" in log
    assert seed in log  # names the agent that holds the id
    # the established agent keeps serving and says what happened, with the other's address
    view = first.get_json("/v1/ring?stats=0")
    assert view["id_conflicts"], view
    assert "'twin'" in view["id_conflicts"][0]["message"]
    assert first.metric("meshkv_mesh_node_id_conflicts_total") >= 1
    assert first.proc is not None and first.proc.poll() is None
    assert "NODE ID CONFLICT" in render_status(first.get_json("/v1/ring"))


def test_a_taken_id_met_through_gossip_is_refused_too(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """The newcomer joins through a third agent and hears of its twin only from the mesh's
    state: it dials the address that claims its id, the handshake is refused, it exits."""
    secret = write_secret(tmp_path)
    seed_agent = agent_factory(name="hub", args=mesh_args(secret)).start()
    seed = peer_address(seed_agent)
    old = agent_factory(name="old", node_id="same", args=mesh_args(secret, join=[seed])).start()
    wait_for(
        "the first 'same' to join",
        lambda: "same" in {m["id"] for m in ring(seed_agent)["members"] if m["state"] == "alive"},
    )
    new = agent_factory(name="new", node_id="same", args=mesh_args(secret, join=[seed]))
    assert refused(new) == 1, new.log()
    assert peer_address(old) in new.log()
    assert old.proc is not None and old.proc.poll() is None
    wait_for("the established twin to record it", lambda: bool(ring(old)["id_conflicts"]))


def test_an_agent_that_cannot_join_says_through_which_seed_and_why(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """A mistyped --join or a wrong secret used to leave an agent alone in silence. Now
    ``/v1/status`` names each seed and its last failure at once, and the log warns after
    ten seconds (then every minute); an agent that joined has no such entries."""
    secret = write_secret(tmp_path)
    first = agent_factory(name="a", args=mesh_args(secret)).start()
    seed = peer_address(first)
    other = tmp_path / "other"
    other.mkdir()
    refused = f"127.0.0.1:{free_port()}"
    lonely = agent_factory(
        name="lonely", args=mesh_args(write_secret(other), join=[seed, refused])
    ).start()

    def errors() -> dict[str, str]:
        return dict(lonely.get_json("/v1/status")["mesh"]["join_errors"])

    wait_for("both seeds' failures", lambda: set(errors()) == {seed, refused}, 10.0)
    wait_for("the refused port's reason", lambda: "cannot connect" in errors()[refused], 10.0)
    assert errors()[seed] != "no answer to the join (yet)"  # the handshake's own failure
    wait_for("the warning", lambda: "still the only member alive" in lonely.log(), 20.0)
    line = next(x for x in lonely.log().splitlines() if "still the only member alive" in x)
    assert seed in line and refused in line and "mesh secret" in line
    joined = agent_factory(name="b", args=mesh_args(secret, join=[seed])).start()
    wait_for("b to join", lambda: joined.get_json("/v1/status")["mesh"]["alive_members"] == 2)
    assert joined.get_json("/v1/status")["mesh"]["join_errors"] == {}
