"""Several real agents become one cache: membership, one ring, lookups through the home."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from meshkv.client import AgentClient
from meshkv.launch import AgentProcess
from tests.helpers.mesh import (
    metric,
    read_verified,
    ring,
    ring_status_json,
    start_mesh,
    wait_converged,
    wait_for,
    write_secret,
)

CONTRACT_MEMBER_KEYS = {"id", "address", "state", "incarnation", "ring_share", "chunks", "bytes"}


def test_chunk_put_on_a_is_served_on_c(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agents = start_mesh(agent_factory, 3, write_secret(tmp_path))
    wait_converged(agents)
    a, b, c = agents
    payloads = {os.urandom(16): os.urandom(1 << 20) for _ in range(6)}
    with a.client() as ca:
        for key, data in payloads.items():
            assert ca.put(key, data, num_tokens=256)
    keys = list(payloads)
    # Homes learn the holder from batched announcements (flush every 50 ms). Wait on the
    # homes' directories, not on lookups from C: a lookup that finds a prefix on a peer
    # starts pulling it, so polling with lookups would make the first keys local early.
    wait_for(
        "announcements to reach the homes",
        lambda: sum(metric(x, "meshkv_mesh_directory_keys") for x in agents) == len(keys),
    )
    with c.client() as cc:
        reply = cc.lookup(keys)
        assert reply.tiers == ["peer"] * len(keys)
        read_verified(c, cc, payloads, wait=5.0)
        # now local on C: a second lookup reports the CPU tier
        assert cc.lookup(keys).tiers == ["cpu"] * len(keys)
    assert metric(c, "meshkv_peer_pulls_total") == len(keys)
    assert metric(c, "meshkv_peer_pull_bytes_total") == sum(len(v) for v in payloads.values())
    # Durations are timed with perf_counter: uvloop's loop.time() moves in whole
    # milliseconds, which made every sum below a whole number of ms (a 1 MiB pull takes
    # less than one here).
    for name in ("meshkv_peer_pull_seconds_sum", "meshkv_flight_seconds_sum"):
        ms = metric(c, name) * 1e3
        assert ms > 0 and abs(ms - round(ms)) > 1e-6, (name, ms)
    # a key nobody holds is a clean miss, quickly
    with b.client() as cb:
        assert cb.lookup([os.urandom(16)]).prefix == 0

    views = [ring_status_json(x) for x in agents]
    digests = {v["ring"]["digest"] for v in views}
    assert len(digests) == 1
    for view, agent in zip(views, agents, strict=True):
        assert view["self"] == agent.name
        assert set(view) == {"self", "members", "ring", "id_conflicts"}
        assert view["id_conflicts"] == []
        assert set(view["ring"]) == {"digest", "max_over_mean"}
        assert [m["id"] for m in view["members"]] == ["a", "b", "c"]
        for m in view["members"]:
            assert set(m) == CONTRACT_MEMBER_KEYS
            assert m["state"] == "alive"
        assert abs(sum(m["ring_share"] for m in view["members"]) - 1.0) < 1e-3
        assert view["ring"]["max_over_mean"] < 1.3
    chunks = {m["id"]: m["chunks"] for m in views[1]["members"]}
    assert chunks == {"a": 6, "b": 0, "c": 6}


def test_ring_owners_and_table(agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> None:
    agents = start_mesh(agent_factory, 2, write_secret(tmp_path))
    wait_converged(agents)
    a, b = agents
    key = os.urandom(16)
    with a.client() as ca:
        assert ca.put(key, b"x" * 4096)
    wait_for(
        "the home to know the holder",
        lambda: b.get_json(f"/v1/owners/{key.hex()}")["holders"] == ["a"],
    )
    row = b.get_json(f"/v1/owners/{key.hex()}")
    assert row["home"] in ("a", "b")
    assert row["home"] == a.get_json(f"/v1/owners/{key.hex()}")["home"]
    out = subprocess.run(
        [sys.executable, "-m", "meshkv", "ring", "owners", key.hex(), "--http", b.http],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"home {row['home']}" in out.stdout and "holders a" in out.stdout
    table = subprocess.run(
        [sys.executable, "-m", "meshkv", "ring", "status", "--http", a.http],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "127.0.0.1" in table.stdout and "max/mean" in table.stdout
    assert len(ring(a)["members"]) == 2
    bad = subprocess.run(
        [sys.executable, "-m", "meshkv", "ring", "owners", "zz", "--http", b.http],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "32 hex digits" in bad.stderr


def test_graceful_leave_is_left_not_dead(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agents = start_mesh(agent_factory, 3, write_secret(tmp_path))
    wait_converged(agents)
    a, b, c = agents
    assert c.stop() == 0
    wait_for(
        "c to be seen as left",
        lambda: {m["id"]: m["state"] for m in ring(a)["members"]}.get("c") == "left",
        5.0,
    )
    wait_converged([a, b])
    assert metric(a, "meshkv_mesh_membership_events_total", 'kind="dead"') == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "127.0.0.1:0"], "--mesh-secret-file"),
        (["--listen", "nohost", "--mesh-secret-file", "{secret}"], "bad peer address"),
        (["--listen", "127.0.0.1:0", "--mesh-secret-file", "{empty}"], "is empty"),
        (["--listen", "127.0.0.1:0", "--mesh-secret-file", "{short}"], "at least 16"),
        (["--listen", "127.0.0.1:0", "--mesh-secret-file", "{tmp}/missing"], "does not exist"),
        (["--listen", "127.0.0.1:0", "--mesh-secret-file", "{secret}", "--replicas", "0"], ">= 1"),
        (["--listen", "127.0.0.1:0", "--mesh-secret-file", "{secret}", "--join", "x:y"], "port"),
        (["--join", "127.0.0.1:1"], "need --listen"),
        (["--listen", "127.0.0.1:0", "--mesh-secret-file", "{shared}"], "chmod 600"),
        (["--admin-token-file", "{shared}"], "accessible by group or others"),
        (
            ["--listen", "127.0.0.1:7000", "--mesh-secret-file", "{secret}", "--transport", "ucx"],
            "cannot listen on 127.0.0.1 only",
        ),
        (
            ["--listen", "0.0.0.0:0", "--mesh-secret-file", "{secret}", "--transport", "ucx"],
            "needs --advertise",
        ),
    ],
)
def test_bad_mesh_flags_are_clear_errors(tmp_path: Path, args: list[str], message: str) -> None:
    from meshkv.cli.agent_cmd import build_config
    from meshkv.cli.main import build_parser
    from meshkv.errors import ConfigError

    secret = write_secret(tmp_path)
    for name, text, mode in (
        ("empty", "  \n", 0o600),
        ("short", "tooshort\n", 0o600),
        ("shared", "a-long-enough-secret-but-group-readable\n", 0o640),
    ):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(mode)
    files = {n: tmp_path / n for n in ("empty", "short", "shared")}
    argv = [x.format(secret=secret, tmp=tmp_path, **files) for x in args]
    parsed = build_parser().parse_args(["agent", "--socket", str(tmp_path / "s.sock"), *argv])
    with pytest.raises(ConfigError, match=message.replace("-", r"\-")):
        build_config(parsed)


def test_bad_mesh_flag_exits_with_the_reason(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshkv", "agent", "--socket", str(tmp_path / "s.sock"),
         "--http", "127.0.0.1:0", "--cpu-bytes", str(16 << 20), "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode != 0
    assert "--mesh-secret-file" in out.stderr, out.stderr


def test_client_namespace_isolation_through_the_mesh(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """A chunk stored under one namespace is never served to another, even via a peer."""
    from meshkv.chunk import Namespace

    agents = start_mesh(agent_factory, 2, write_secret(tmp_path))
    wait_converged(agents)
    a, b = agents
    key = os.urandom(16)
    with AgentClient(a.socket_path, namespace=Namespace(model="m1")) as ca:
        assert ca.put(key, b"y" * 8192)
    wait_for(
        "the holder to be announced",
        lambda: b.get_json(f"/v1/owners/{key.hex()}")["holders"] == ["a"],
    )
    with AgentClient(b.socket_path, namespace=Namespace(model="m2")) as other:
        other.lookup([key])
        (lease,) = other.read([key], wait=2.0)
        assert lease is None


def test_ring_status_on_an_agent_without_mesh_says_so(agent: AgentProcess) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshkv", "ring", "status", "--http", agent.http],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode != 0
    assert "runs without a mesh" in out.stderr


def test_mesh_table_in_toml_and_flags_override(tmp_path: Path) -> None:
    from meshkv.cli.agent_cmd import build_config
    from meshkv.cli.main import build_parser
    from meshkv.errors import ConfigError
    from meshkv.mesh.options import MeshNodeConfig

    secret = write_secret(tmp_path)
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f'node_id = "n1"\n[mesh]\nlisten = "127.0.0.1:7946"\njoin = ["10.0.0.1:7946"]\n'
        f'secret_file = "{secret}"\nreplicas = 2\npreset = "local"\n'
    )
    base = ["agent", "--socket", str(tmp_path / "s.sock"), "--config", str(toml)]
    config = build_config(build_parser().parse_args(base))
    mesh = config.mesh
    assert isinstance(mesh, MeshNodeConfig)
    assert (mesh.listen, mesh.join, mesh.replicas, mesh.preset) == (
        "127.0.0.1:7946",
        ("10.0.0.1:7946",),
        2,
        "local",
    )
    assert mesh.membership.probe_interval_s == 0.2  # the LOCAL preset's timings
    override = build_config(build_parser().parse_args([*base, "--replicas", "3"]))
    assert isinstance(override.mesh, MeshNodeConfig) and override.mesh.replicas == 3
    toml.write_text(toml.read_text() + "colour = 1\n")
    with pytest.raises(ConfigError, match=r"\[mesh\]: unknown keys"):
        build_config(build_parser().parse_args(base))
