"""Mutual TLS between agents: certificates from one CA mesh and pull; anyone else is refused."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from meshkv.errors import ConfigError
from meshkv.launch import AgentProcess
from tests.helpers.mesh import mesh_args, peer_address, ring, wait_converged, wait_for, write_secret


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "1", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
        cwd=d,
    )  # fmt: skip


def make_cert(d: Path, ca: str, name: str) -> list[str]:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "1", "-out", f"{name}.pem", cwd=d,
    )  # fmt: skip
    (d / f"{name}.key").chmod(0o600)
    return [
        "--tls-cert", str(d / f"{name}.pem"),
        "--tls-key", str(d / f"{name}.key"),
        "--tls-ca", str(d / f"{ca}.pem"),
    ]  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    d.mkdir()
    make_ca(d, "mesh-ca")
    make_ca(d, "other-ca")
    return d


def test_agents_with_certificates_from_the_mesh_ca_mesh_and_pull_over_tls(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path, pki: Path
) -> None:
    secret = write_secret(tmp_path)
    a = agent_factory(name="a", args=mesh_args(secret) + make_cert(pki, "mesh-ca", "a")).start()
    seed = peer_address(a)
    b = agent_factory(
        name="b", args=mesh_args(secret, join=[seed]) + make_cert(pki, "mesh-ca", "b")
    ).start()
    wait_converged([a, b])
    payload = os.urandom(4 << 20)
    key = os.urandom(16)
    with a.client() as ca:
        assert ca.put(key, payload)
    with b.client(timeout=5.0) as cb:
        wait_for("the holder announced", lambda: cb.lookup([key]).prefix == 1)
        (lease,) = cb.read([key], wait=5.0)
        assert lease is not None
        try:
            assert bytes(lease.view) == payload
        finally:
            cb.release([lease])

    # the same secret but a certificate from another CA, or no TLS at all: refused
    rogue = agent_factory(
        name="rogue", args=mesh_args(secret, join=[seed]) + make_cert(pki, "other-ca", "rogue")
    ).start()
    plain = agent_factory(name="plain", args=mesh_args(secret, join=[seed])).start()
    time.sleep(3.0)  # several join retries
    for outsider in ("rogue", "plain"):
        assert outsider not in {m["id"] for m in ring(a)["members"] if m["state"] == "alive"}
    assert a.metric("meshkv_peer_handshake_failures_total") >= 2
    assert {m["id"] for m in ring(b)["members"] if m["state"] == "alive"} == {"a", "b"}
    for outsider, name in ((rogue, "rogue"), (plain, "plain")):
        assert {m["id"] for m in ring(outsider)["members"] if m["state"] == "alive"} == {name}


def test_tls_flags_are_checked_at_start(tmp_path: Path, pki: Path) -> None:
    from meshkv.cli.agent_cmd import build_config
    from meshkv.cli.main import build_parser

    secret = write_secret(tmp_path)
    good = make_cert(pki, "mesh-ca", "n1")

    def config(*extra: str) -> object:
        base = ["agent", "--socket", str(tmp_path / "s.sock"), *mesh_args(secret), *extra]
        return build_config(build_parser().parse_args(base))

    assert config(*good)
    with pytest.raises(ConfigError, match="go together"):
        config(*good[:2])
    with pytest.raises(ConfigError, match="TLS is for --transport tcp"):
        config(*good, "--transport", "ucx")
    Path(good[3]).chmod(0o644)
    with pytest.raises(ConfigError, match="--tls-key .* accessible by group or others"):
        config(*good)
    Path(good[3]).chmod(0o600)
    with pytest.raises(ConfigError, match="--tls-ca .* unusable"):
        config(*good[:4], "--tls-ca", str(pki / "n1.csr"))
