"""The agent's mesh flags and ``[mesh]`` TOML table (the ``meshkv.cli.agent_cmd`` hook).

``meshkv agent --listen HOST:PORT --join HOST:PORT[,HOST:PORT] --mesh-secret-file F
--transport tcp|ucx --replicas R --mesh-preset lan|local`` (flags override the TOML
table's ``listen``, ``join``, ``advertise``, ``secret_file``, ``transport``, ``replicas``,
``preset``). Without ``--listen`` the agent runs alone. The secret file is read here.
"""

from __future__ import annotations

import argparse
from typing import Any

from meshkv.errors import ConfigError
from meshkv.mesh.options import PRESETS, TRANSPORTS, MeshNodeConfig, read_secret
from meshkv.mesh.tls import TlsFiles

TOML_KEYS = (
    "listen",
    "join",
    "advertise",
    "secret_file",
    "transport",
    "replicas",
    "preset",
    "tls_cert",
    "tls_key",
    "tls_ca",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Mesh flags; each defaults to None (= not given) so TOML values are kept."""
    g = parser.add_argument_group("mesh (peer agents)")
    g.add_argument("--listen", metavar="HOST:PORT", help="peer port; enables the mesh")
    g.add_argument(
        "--join",
        metavar="HOST:PORT[,HOST:PORT]",
        action="append",
        help="peer ports of agents to join through (repeatable)",
    )
    g.add_argument("--advertise", metavar="HOST:PORT", help="address announced to peers")
    g.add_argument(
        "--mesh-secret-file", metavar="FILE", help="file holding the mesh secret (>= 16 bytes)"
    )
    g.add_argument("--transport", choices=TRANSPORTS, help="peer transport (default: tcp)")
    g.add_argument(
        "--replicas", type=int, metavar="R", help="copies of each chunk in the mesh (default: 1)"
    )
    g.add_argument("--mesh-preset", choices=PRESETS, help="failure-detector timings (default: lan)")
    g.add_argument("--tls-cert", metavar="PEM", help="this agent's certificate (mutual TLS, tcp)")
    g.add_argument("--tls-key", metavar="PEM", help="its private key (must be chmod 600)")
    g.add_argument("--tls-ca", metavar="PEM", help="the CA that signs every agent's certificate")


def mesh_config(args: argparse.Namespace, table: dict[str, Any] | None) -> MeshNodeConfig | None:
    """The mesh config the flags and TOML ask for; None when no peer port is configured."""
    values: dict[str, Any] = {}
    if table is not None:
        unknown = sorted(set(table) - set(TOML_KEYS))
        if unknown:
            raise ConfigError(f"[mesh]: unknown keys {unknown}; known: {list(TOML_KEYS)}")
        values.update(table)
    for flag, key in (
        ("listen", "listen"),
        ("join", "join"),
        ("advertise", "advertise"),
        ("mesh_secret_file", "secret_file"),
        ("transport", "transport"),
        ("replicas", "replicas"),
        ("mesh_preset", "preset"),
        ("tls_cert", "tls_cert"),
        ("tls_key", "tls_key"),
        ("tls_ca", "tls_ca"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            values[key] = value
    if not values.get("listen"):
        given = [k for k in ("join", "secret_file", "advertise") if values.get(k)]
        if given:
            raise ConfigError(f"mesh settings {given} need --listen HOST:PORT (the peer port)")
        return None
    if not values.get("secret_file"):
        raise ConfigError("--listen needs --mesh-secret-file FILE (the shared mesh secret)")
    join = values.get("join") or ()
    if isinstance(join, str):
        join = [s for s in join.split(",")]
    if not isinstance(join, list | tuple) or not all(isinstance(s, str) for s in join):
        raise ConfigError("--join must be HOST:PORT[,HOST:PORT]")
    # --join repeated, each a comma list, or a TOML list whose items may be comma lists
    join = tuple(p.strip() for s in join for p in s.split(",") if p.strip())
    tls_given = [k for k in ("tls_cert", "tls_key", "tls_ca") if values.get(k)]
    tls = None
    if tls_given:
        if len(tls_given) != 3:
            raise ConfigError("--tls-cert, --tls-key and --tls-ca go together (mutual TLS)")
        if str(values.get("transport", "tcp")) != "tcp":
            raise ConfigError("TLS is for --transport tcp (UCX traffic is not encrypted)")
        tls = TlsFiles(str(values["tls_cert"]), str(values["tls_key"]), str(values["tls_ca"]))
        tls.contexts()  # unusable files fail here, at start
    replicas = values.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        raise ConfigError(f"--replicas must be an integer, got {replicas!r}")
    return MeshNodeConfig.from_preset(
        str(values.get("preset", "lan")),
        listen=str(values["listen"]),
        join=join,
        advertise=values.get("advertise"),
        secret=read_secret(str(values["secret_file"])),
        transport=str(values.get("transport", "tcp")),
        replicas=replicas,
        tls=tls,
    )
