"""``meshkv agent``: run this node's agent (CPU + SSD tiers, local socket, HTTP admin).

Flags override the TOML file given by ``--config``, which overrides the defaults. The
environment is read here only (``XDG_RUNTIME_DIR`` for the default socket directory).
Mesh flags (``--listen``, ``--join``, ...) come from ``meshkv.mesh.cli``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import sys
from typing import Any

from meshkv.config import (
    DEFAULT_HTTP_HOST,
    DEFAULT_HTTP_PORT,
    LOG_LEVELS,
    AgentConfig,
    build_store_config,
    load_toml,
    parse_host_port,
)
from meshkv.errors import ConfigError, MeshKVError
from meshkv.loop import loop_factory
from meshkv.mesh import cli as mesh_cli
from meshkv.mesh.options import MeshNodeConfig
from meshkv.paths import default_socket_path
from meshkv.tiers.cpu import CpuTierConfig
from meshkv.tiers.remote import RemoteTierConfig
from meshkv.tiers.ssd import SsdTierConfig
from meshkv.transport.base import parse_address

GB = 1 << 30
MB = 1 << 20
EVICTION_POLICIES = ("lru", "s3fifo")

logger = logging.getLogger("meshkv.agent")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "agent",
        help="run this node's meshkv agent",
        description="Run the node's meshkv agent: CPU tier (shared-memory arena), SSD tier, "
        "the local socket engines connect to, and the HTTP admin API. Flags override "
        "--config; SIGTERM/SIGINT shut it down cleanly.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag defaults to None = 'not given', so that TOML values are kept."""
    cpu = CpuTierConfig.__dataclass_fields__
    ssd = SsdTierConfig.__dataclass_fields__
    p.add_argument("--config", metavar="FILE.toml", help="TOML configuration file (default: none)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--cpu-gb",
        type=float,
        metavar="N",
        help=f"CPU tier (arena) size in GiB (default: {_default(cpu, 'capacity_bytes') / GB:g})",
    )
    size.add_argument("--cpu-bytes", type=int, metavar="N", help="CPU tier size in bytes")
    p.add_argument(
        "--ssd-dir",
        metavar="DIR",
        help="directory of the SSD tier; must exist (default: no SSD tier)",
    )
    p.add_argument(
        "--ssd-gb",
        type=float,
        metavar="N",
        help=f"SSD tier cap in GiB (default: {_default(ssd, 'capacity_bytes') / GB:g})",
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        help=f"local-channel Unix socket (default: {default_socket_path(os.environ)})",
    )
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        help=f"admin HTTP address; port 0 picks a free port "
        f"(default: {DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT})",
    )
    p.add_argument(
        "--ready-file",
        metavar="FILE",
        help="write JSON {socket, http, pid, arena_name, ...} here once serving (default: none)",
    )
    p.add_argument(
        "--eviction",
        metavar="POLICY",
        help=f"CPU-tier eviction policy: {' or '.join(EVICTION_POLICIES)} "
        f"(default: {_default(cpu, 'eviction')})",
    )
    p.add_argument(
        "--write-through",
        action="store_true",
        default=None,
        help="write every committed chunk to SSD at once, not only on eviction (default: off)",
    )
    p.add_argument(
        "--verify-reads",
        action="store_true",
        default=None,
        help="re-check arena bytes against the checksum before every read (default: off)",
    )
    p.add_argument(
        "--lease-seconds",
        type=float,
        metavar="S",
        help="lifetime of a read pin (default: 30)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        metavar="S",
        help="shutdown budget for in-flight requests and the SSD flush (default: 5)",
    )
    p.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help="bearer token for POST /v1/clear (default: none = endpoint disabled)",
    )
    p.add_argument(
        "--node-id",
        metavar="ID",
        help=f"node name, unique in the mesh (default: HOST-PEERPORT, e.g. "
        f"{socket.gethostname()}-7946; the bare host name without --listen)",
    )
    p.add_argument(
        "--log-level",
        metavar="LEVEL",
        help=f"one of {', '.join(LOG_LEVELS)} (default: info)",
    )
    remote = RemoteTierConfig.__dataclass_fields__
    r = p.add_argument_group(
        "remote tier",
        "a Redis or Valkey server shared by the mesh, below each node's own tiers "
        "(docs/tiers.md, 'Remote tier')",
    )
    r.add_argument(
        "--remote",
        metavar="URL",
        help="redis://[USER@]HOST[:PORT][/DB], rediss:// for TLS (default: no remote tier)",
    )
    r.add_argument(
        "--remote-password-file",
        metavar="FILE",
        help="file (mode 600) holding the server's password (default: none)",
    )
    r.add_argument(
        "--remote-tls-ca",
        metavar="FILE",
        help="CA bundle of the server's certificate for rediss:// (default: the system's)",
    )
    r.add_argument(
        "--remote-ttl",
        type=float,
        metavar="S",
        help=f"seconds a value lives after its last write or read "
        f"(default: {_default(remote, 'ttl_s'):g})",
    )
    r.add_argument(
        "--remote-gb",
        type=float,
        metavar="N",
        help=f"cap in GiB on all values under the key prefix, every node's together "
        f"(default: {_default(remote, 'max_bytes') / GB:g})",
    )
    r.add_argument(
        "--remote-queue-mb",
        type=float,
        metavar="N",
        help=f"write-behind queue in MiB; chunks beyond it are dropped and counted "
        f"(default: {_default(remote, 'queue_bytes') / MB:g})",
    )
    r.add_argument(
        "--remote-prefix",
        metavar="WORD",
        help=f"prefix of every key meshkv writes (default: {_default(remote, 'key_prefix')})",
    )
    mesh_cli.add_arguments(p)


def remote_config(
    args: argparse.Namespace, table: dict[str, Any] | None
) -> RemoteTierConfig | None:
    """``[remote]`` merged with the ``--remote*`` flags; None when neither names a URL."""
    values: dict[str, Any] = dict(table or {})
    if args.remote is not None:
        values["url"] = args.remote
    flags = {
        "remote_password_file": "password_file",
        "remote_tls_ca": "tls_ca_file",
        "remote_ttl": "ttl_s",
        "remote_prefix": "key_prefix",
    }
    for flag, name in flags.items():
        if getattr(args, flag) is not None:
            values[name] = getattr(args, flag)
    if args.remote_gb is not None:
        values["max_bytes"] = _size_flag("--remote-gb", args.remote_gb * GB)
    if args.remote_queue_mb is not None:
        values["queue_bytes"] = _size_flag("--remote-queue-mb", args.remote_queue_mb * MB)
    if "url" not in values:
        if values:
            given = ", ".join(sorted(values))
            raise ConfigError(f"remote tier settings ({given}) need a URL: give --remote URL")
        return None
    config = RemoteTierConfig(**values)
    config.password()  # an unreadable or public password file fails here, not at start
    config.check_ca()
    return config


def _default(fields: dict[str, Any], name: str) -> Any:
    f = fields[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def build_config(args: argparse.Namespace) -> AgentConfig:
    """Defaults ← TOML ← flags, validated; raises ``ConfigError`` with the reason."""
    toml: dict[str, Any] = {
        "agent": {},
        "store": {"cpu": {}, "ssd": None},
        "mesh": None,
        "remote": None,
        "deprecations": [],
    }
    if args.config:
        toml = load_toml(args.config)
    for message in toml["deprecations"]:
        print(f"meshkv agent: warning: {message}", file=sys.stderr)
    agent: dict[str, Any] = dict(toml["agent"])
    store: dict[str, Any] = dict(toml["store"])
    cpu: dict[str, Any] = dict(store["cpu"])
    ssd: dict[str, Any] | None = None if store["ssd"] is None else dict(store["ssd"])

    if args.cpu_gb is not None:
        cpu["capacity_bytes"] = _size_flag("--cpu-gb", args.cpu_gb * GB)
    if args.cpu_bytes is not None:
        cpu["capacity_bytes"] = _size_flag("--cpu-bytes", args.cpu_bytes)
    if args.ssd_dir is not None:
        ssd = dict(ssd or {}, directory=args.ssd_dir)
    if args.ssd_gb is not None:
        if ssd is None:
            raise ConfigError("--ssd-gb needs an SSD tier: give --ssd-dir (or [store.ssd])")
        ssd["capacity_bytes"] = _size_flag("--ssd-gb", args.ssd_gb * GB)
    if args.eviction is not None:
        if args.eviction not in EVICTION_POLICIES:
            raise ConfigError(
                f"--eviction must be one of {', '.join(EVICTION_POLICIES)}, got {args.eviction!r}"
            )
        cpu["eviction"] = args.eviction
    if args.write_through:
        store["write_through"] = True
    if args.verify_reads:
        store["verify_reads"] = True
    if ssd is not None and not ssd.get("directory"):
        raise ConfigError("[store.ssd] needs a directory (in the table, or --ssd-dir DIR)")
    ssd_dir = None if ssd is None else ssd.get("directory")
    if ssd_dir is not None and not os.path.isdir(ssd_dir):
        if os.path.exists(ssd_dir):
            raise ConfigError(f"SSD directory {ssd_dir} is not a directory")
        raise ConfigError(f"SSD directory {ssd_dir} does not exist (create it first)")

    ready_dir = os.path.dirname(os.path.abspath(args.ready_file)) if args.ready_file else None
    if ready_dir is not None and not os.path.isdir(ready_dir):
        raise ConfigError(f"--ready-file: directory {ready_dir} does not exist")

    if args.socket is not None:
        agent["socket_path"] = args.socket
    agent.setdefault("socket_path", default_socket_path(os.environ))
    if args.http is not None:
        agent["http_host"], agent["http_port"] = parse_host_port(args.http)
    for flag in ("lease_seconds", "drain_seconds", "admin_token_file", "ready_file", "log_level"):
        value = getattr(args, flag)
        if value is not None:
            agent[flag] = value
    mesh = mesh_cli.mesh_config(args, toml["mesh"])
    if args.node_id is not None:
        agent["node_id"] = args.node_id
    agent.setdefault("node_id", default_node_id(socket.gethostname(), mesh, os.getpid()))
    store["cpu"], store["ssd"] = cpu, ssd
    try:
        store_config = build_store_config(store)
    except TypeError as exc:
        raise ConfigError(f"bad store settings: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"store settings (--cpu-gb, --ssd-gb, [store]): {exc}") from exc
    remote = remote_config(args, toml["remote"])
    config = AgentConfig(store=store_config, mesh=mesh, remote=remote, **agent)
    config.admin_token()  # an unreadable or weak token file fails here, not at start
    loop_factory()  # and so does a bad MESHKV_EVENT_LOOP
    return config


def default_node_id(host: str, mesh: MeshNodeConfig | None, pid: int) -> str:
    """``HOST-PORT`` (the peer port) for a mesh member, so that several agents on one host
    and restarts on the same port keep distinct, stable ids; the bare host name without a
    mesh; ``HOST-pPID`` when the peer port is chosen by the system (port 0)."""
    if mesh is None:
        return host
    _, port = parse_address(mesh.advertise or mesh.listen)
    return f"{host}-{port}" if port else f"{host}-p{pid}"


def _size_flag(flag: str, value: float) -> int:
    if value <= 0:
        raise ConfigError(f"{flag} must be positive, got {value:g}")
    return int(value)


def run(args: argparse.Namespace) -> int:
    from meshkv.agent import run_agent  # keep `meshkv --help` fast

    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"meshkv agent: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level_number,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        run_agent(config)
    except MeshKVError as exc:
        print(f"meshkv agent: error: {exc}", file=sys.stderr)
        return 1
    return 0
