"""``AgentConfig``: the agent's typed configuration, composed of the components' configs.

Sources, later wins: the dataclass defaults, a TOML file (``--config``), command-line
flags. Nothing here reads the environment (the CLI does). TOML layout::

    node_id = "gpu-node-7"
    socket = "/run/meshkv/agent.sock"
    http = "127.0.0.1:7471"
    lease_seconds = 30.0
    drain_seconds = 5.0
    admin_token_file = "/etc/meshkv/admin-token"
    log_level = "info"

    [store]             # meshkv.store.StoreConfig's own fields
    write_through = false
    [store.cpu]         # meshkv.tiers.cpu.CpuTierConfig
    capacity_bytes = 4294967296
    [store.ssd]         # meshkv.tiers.ssd.SsdTierConfig; absent = no SSD tier
    directory = "/var/cache/meshkv"

    [mesh]              # meshkv.mesh.cli's keys (see docs/agent.md); absent = no mesh

    [remote]            # meshkv.tiers.remote.RemoteTierConfig; absent = no remote tier
    url = "redis://10.0.0.5:6379/0"

Unknown keys and wrongly typed values are rejected with the file, the table and the key
in the message. The flat ``[store]`` keys of earlier releases (``cpu_bytes``, ``ssd_dir``,
...) still work; each one met is reported as deprecated, with its new place.
``docs/agent.md`` lists every key with its default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from meshkv.errors import ConfigError
from meshkv.mesh.options import MeshNodeConfig
from meshkv.paths import check_private_file
from meshkv.store_config import LEGACY_KEYS, StoreConfig
from meshkv.tiers.cpu import CpuTierConfig
from meshkv.tiers.remote import RemoteTierConfig
from meshkv.tiers.ssd import SsdTierConfig

DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 7471
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclasses.dataclass(slots=True)
class AgentConfig:
    """Everything one ``meshkv agent`` needs."""

    node_id: str
    """Name of this node in logs, status and (later) the mesh."""
    socket_path: str
    """Unix socket of the local channel (its directory is created 0700)."""
    store: StoreConfig
    """CPU and SSD tiers (owned by ``meshkv.store``)."""
    http_host: str = DEFAULT_HTTP_HOST
    """Address the admin HTTP server binds (loopback by default)."""
    http_port: int = DEFAULT_HTTP_PORT
    """Admin HTTP port; 0 picks a free one (reported in the log and the ready file)."""
    lease_seconds: float = 30.0
    """Lifetime of a read pin; an engine that dies holding one loses it after this."""
    drain_seconds: float = 5.0
    """On SIGTERM/SIGINT: how long in-flight requests and the SSD flush may take."""
    admin_token_file: str | None = None
    """File holding the bearer token for mutating admin endpoints; None disables them."""
    ready_file: str | None = None
    """Once serving, write a JSON file here: socket, http address, pid, arena, node id."""
    log_level: str = "info"
    """One of debug, info, warning, error."""
    mesh: MeshNodeConfig | None = None
    """The mesh's config (owned by ``meshkv.mesh``); None: this agent runs alone."""
    remote: RemoteTierConfig | None = None
    """The shared Redis/Valkey tier below this node's own; None: none."""

    def __post_init__(self) -> None:
        if not self.node_id or any(c.isspace() for c in self.node_id):
            raise ConfigError(f"node id must be a non-empty word, got {self.node_id!r}")
        if not self.socket_path:
            raise ConfigError("socket path must not be empty")
        if len(self.socket_path.encode()) > 107:
            raise ConfigError(
                f"socket path is {len(self.socket_path.encode())} bytes; "
                "Unix sockets allow at most 107"
            )
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http port must be in 0..65535, got {self.http_port}")
        check_host(self.http_host)
        if not self.lease_seconds > 0:
            raise ConfigError(f"lease seconds must be > 0, got {self.lease_seconds}")
        if not self.drain_seconds >= 0:
            raise ConfigError(f"drain seconds must be >= 0, got {self.drain_seconds}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"log level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"
            )

    @property
    def log_level_number(self) -> int:
        return int(getattr(logging, self.log_level.upper()))

    def admin_token(self) -> str | None:
        """Read the admin token file (None if not configured)."""
        if self.admin_token_file is None:
            return None
        try:
            check_private_file(Path(self.admin_token_file), "admin token file")
            token = Path(self.admin_token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read admin token file {self.admin_token_file}: {exc.strerror}"
            ) from exc
        if len(token) < 16:
            raise ConfigError(
                f"admin token in {self.admin_token_file} is {len(token)} characters; "
                "use at least 16"
            )
        return token


def check_host(host: str) -> str:
    """Accept an IP literal or a plain host name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not host or not all(part.isalnum() or "-" in part for part in host.split(".")):
            raise ConfigError(f"not a host name or IP address: {host!r}") from None
    return host


def parse_host_port(text: str, *, what: str = "--http") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → (host, port); port 0 means any free port."""
    scheme, found, rest = text.partition("://")
    if found:  # a URL where an address belongs: say which address
        address = rest.split("/", 1)[0]
        raise ConfigError(
            f"{what} takes HOST:PORT, not a URL: got {text!r}"
            + (f" (did you mean {what} {address}?)" if address else "")
        )
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what} must be HOST:PORT (e.g. 127.0.0.1:7471), got {text!r}")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{what}: port {port_text!r} is not a number (in {text!r})") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port {port} is outside 0..65535 (in {text!r})")
    return check_host(host), port


# --- TOML --------------------------------------------------------------------------

# Top-level TOML keys that differ from field names.
_TOP_LEVEL_ALIASES = {"socket": "socket_path", "http": None}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into keyword arguments for ``AgentConfig`` pieces.

    Returns ``{"agent": {...}, "store": {"cpu": {...}, "ssd": {...} | None, ...},
    "mesh": table or None, "remote": {...} or None, "deprecations": [message, ...]}`` with
    every key checked
    against the dataclass fields and their types.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:  # found by the toml_config fuzz target
        raise ConfigError(f"config file {path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc
    store_table = raw.pop("store", {})
    mesh_table = raw.pop("mesh", None)
    remote_table = raw.pop("remote", None)
    agent: dict[str, Any] = {}
    agent_fields = {
        f.name for f in dataclasses.fields(AgentConfig) if f.name not in ("store", "mesh", "remote")
    }
    known = sorted((agent_fields - {"socket_path"}) | {"socket", "http", "store", "mesh", "remote"})
    hints = typing.get_type_hints(AgentConfig)
    for key, value in raw.items():
        if key == "http":
            if not isinstance(value, str):
                raise ConfigError(f"{path}: 'http' must be a \"HOST:PORT\" string")
            agent["http_host"], agent["http_port"] = parse_host_port(value, what=f"{path}: http")
            continue
        name = _TOP_LEVEL_ALIASES.get(key, key) or key
        if name not in agent_fields:
            raise ConfigError(
                f"{path}: unknown key {key!r} at the top level; known keys: {', '.join(known)}"
            )
        agent[name] = _check_type(path, "", key, value, hints[name])
    if not isinstance(store_table, dict):
        raise ConfigError(f"{path}: 'store' must be a table ([store])")
    deprecations: list[str] = []
    store = store_kwargs(path, store_table, deprecations)
    if mesh_table is not None and not isinstance(mesh_table, dict):
        raise ConfigError(f"{path}: 'mesh' must be a table ([mesh])")
    remote: dict[str, Any] | None = None
    if remote_table is not None:
        if not isinstance(remote_table, dict):
            raise ConfigError(f"{path}: 'remote' must be a table ([remote])")
        remote = table_kwargs(path, "remote", remote_table, RemoteTierConfig)
    return {
        "agent": agent,
        "store": store,
        "mesh": mesh_table,
        "remote": remote,
        "deprecations": deprecations,
    }


def store_kwargs(path: Path, table: dict[str, Any], deprecations: list[str]) -> dict[str, Any]:
    """The ``[store]`` table (with ``[store.cpu]`` / ``[store.ssd]``) as checked kwargs:
    ``{"cpu": {...}, "ssd": {...} | None, <StoreConfig fields>}``. Legacy flat keys are
    moved to their sub-table and reported in ``deprecations``."""
    table = dict(table)
    cpu = table.pop("cpu", {})
    ssd = table.pop("ssd", None)
    for name, value in (("cpu", cpu), ("ssd", ssd)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}: 'store.{name}' must be a table ([store.{name}])")
    cpu = table_kwargs(path, "store.cpu", cpu, CpuTierConfig)
    ssd = None if ssd is None else table_kwargs(path, "store.ssd", ssd, SsdTierConfig)
    ssd_given = ssd is not None
    for old in [k for k in table if k in LEGACY_KEYS]:
        sub, field = LEGACY_KEYS[old]
        value = table.pop(old)
        target = cpu if sub == "cpu" else ssd if ssd is not None else {}
        if field in target:
            raise ConfigError(
                f"{path}: [store] {old} and [store.{sub}] {field} are the same setting; "
                f"give it once, as [store.{sub}] {field}"
            )
        cls = CpuTierConfig if sub == "cpu" else SsdTierConfig
        target[field] = _check_type(path, "store", old, value, typing.get_type_hints(cls)[field])
        if sub == "ssd" and ssd is None:
            ssd = target
        deprecations.append(
            f"{path}: [store] {old} is deprecated; write it as [store.{sub}] {field}"
        )
    if ssd is not None and "directory" not in ssd and not ssd_given:
        ssd = None  # legacy ssd_* keys without ssd_dir: as before, no SSD tier

    out = table_kwargs(path, "store", table, StoreConfig, exclude=("cpu", "ssd"))
    out["cpu"] = cpu
    out["ssd"] = ssd
    return out


def table_kwargs(
    path: Path, table: str, values: dict[str, Any], cls: type, exclude: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check a TOML table against dataclass ``cls``: known keys, right types."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in exclude}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            known = sorted(fields | set(exclude))
            if table == "store":
                known += sorted(LEGACY_KEYS)
            raise ConfigError(
                f"{path}: unknown key {key!r} in [{table}]; known keys: {', '.join(known)}"
            )
        out[key] = _check_type(path, table, key, value, hints[key])
    return out


def _check_type(path: Path, table: str, key: str, value: Any, hint: Any) -> Any:
    allowed = _allowed_types(hint)
    if allowed is None:  # a type we do not check here; the dataclass validates it
        return value
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    else:
        ok = isinstance(value, tuple(allowed))
    if not ok and float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        where = f"[{table}] " if table else ""
        names = " or ".join(t.__name__ for t in allowed)
        raise ConfigError(
            f"{path}: {where}{key} must be {names}, got {type(value).__name__} {value!r}"
        )
    return value


def _allowed_types(hint: Any) -> list[type] | None:
    simple = (int, float, str, bool)
    if hint in simple:
        return [hint]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        out: list[type] = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            if arg not in simple:
                return None
            out.append(arg)
        return out
    return None


def build_store_config(values: dict[str, Any]) -> StoreConfig:
    """``StoreConfig`` from ``store_kwargs``-shaped values (TOML merged with flags)."""
    values = dict(values)
    cpu = CpuTierConfig(**values.pop("cpu", {}))
    ssd_values = values.pop("ssd", None)
    ssd = None if ssd_values is None else SsdTierConfig(**ssd_values)
    return StoreConfig(cpu=cpu, ssd=ssd, **values)
