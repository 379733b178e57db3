"""``meshkv status``: show a running agent's status (from its HTTP ``/v1/status``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import urllib.error
import urllib.request
from typing import Any

from meshkv.config import DEFAULT_HTTP_HOST, DEFAULT_HTTP_PORT, parse_host_port
from meshkv.errors import ConfigError

LOCAL_AGENT = f"{DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT}"
"""This host's agent's admin address, where it listens unless told otherwise."""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "status",
        help="show a running agent's status",
        description="Print the status of the agent whose admin HTTP listens on --http.",
    )
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        default=LOCAL_AGENT,
        help=f"agent admin address (default: {LOCAL_AGENT})",
    )
    p.add_argument("--json", action="store_true", help="print the raw /v1/status JSON")
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=3.0,
        metavar="S",
        help="HTTP timeout (default: 3)",
    )
    p.set_defaults(func=run)


def admin_url(address: str) -> str:
    """``http://HOST:PORT`` of an agent's admin address given as ``--http HOST:PORT``
    (``ConfigError`` when it is not one)."""
    host, port = parse_host_port(address)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def positive_seconds(text: str) -> float:
    """argparse type of ``--timeout``: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def fetch_status(address: str, timeout: float) -> dict[str, Any]:
    url = admin_url(address) + "/v1/status"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        doc = json.load(response)
    if not isinstance(doc, dict) or "node_id" not in doc:
        raise ValueError("not an agent's status document")
    return doc


def run(args: argparse.Namespace) -> int:
    try:
        doc = fetch_status(args.http, args.timeout)
    except ConfigError as exc:
        print(f"meshkv status: error: {exc}", file=sys.stderr)
        return 2
    except urllib.error.HTTPError as exc:  # something answers, but not as an agent does
        print(
            f"meshkv status: error: http://{args.http} is not a meshkv agent's admin address "
            f"(GET /v1/status answered {exc.code}); pass the agent's --http",
            file=sys.stderr,
        )
        return 1
    except ValueError:
        print(
            f"meshkv status: error: http://{args.http} is not a meshkv agent's admin address "
            "(GET /v1/status did not answer an agent's JSON); pass the agent's --http",
            file=sys.stderr,
        )
        return 1
    except (OSError, urllib.error.URLError) as exc:
        reason = getattr(exc, "reason", exc)
        print(
            f"meshkv status: error: no agent answering at http://{args.http} ({reason})",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render(doc))
    return 0


def render(doc: dict[str, Any]) -> str:
    """A human view of a ``/v1/status`` document: a summary line per section, the tier
    table, then the store's counters. A node id conflict comes first, in capitals."""
    lines: list[str] = []
    mesh = _section(doc, "mesh")
    for c in mesh.get("id_conflicts") or []:
        at = c.get("at_s") if isinstance(c, dict) else None
        message = c.get("message") if isinstance(c, dict) else c
        when = f" ({at:.0f} s after start)" if isinstance(at, int | float) else ""
        lines.append(f"NODE ID CONFLICT{when}: {message}")
    process = _section(doc, "process")
    pid = f", pid {process['pid']}" if "pid" in process else ""
    lines.append(
        f"node      {doc.get('node_id')}  (meshkv {doc.get('version')}, "
        f"up {_duration(doc.get('uptime_s', 0.0))}{pid})"
    )
    local = _section(doc, "local")
    if local:
        lines.append(
            f"socket    {local.get('socket')}  ({local.get('connections')} connections, "
            f"arena {local.get('arena_name')})"
        )
        lines.append(f"lookups   {_lookups(local)}")
    if mesh:
        lines.append(f"mesh      {_mesh(mesh)}")
    transfers = _section(doc, "transfers")
    if transfers:
        lines.append(f"transfers {_transfers(transfers)}")
    remote = _section(doc, "remote")
    if remote:
        state = "up" if remote.get("up") else f"DOWN (backing off {remote.get('backed_off_s')} s)"
        lines.append(
            f"remote    {remote.get('url')}  {state}, "
            f"{_num(remote.get('queued_bytes', 0), 'bytes')} queued"
        )
    if process:
        lines.append(f"process   {_process(process)}")
    namespaces = doc.get("namespaces")
    if isinstance(namespaces, list):
        lines.extend(_engines(namespaces))
    for section, value in doc.items():
        if section in KNOWN_SECTIONS:
            continue
        lines.append(f"{section.ljust(9)} {_flat(value)}")
    store = doc.get("store") or {}
    tiers = store.get("tiers") if isinstance(store.get("tiers"), dict) else None
    if tiers:
        lines.append("")
        lines.append(_table(tiers))
    scalars = {k: v for k, v in store.items() if not isinstance(v, dict | list) and k != "tiers"}
    if scalars:
        lines.append("")
        width = max(len(k) for k in scalars)
        lines.extend(f"{k.ljust(width)}  {_num(v, k)}" for k, v in sorted(scalars.items()))
    return "\n".join(lines)


def _section(doc: dict[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name)
    return value if isinstance(value, dict) else {}


KNOWN_SECTIONS = (
    "node_id", "version", "uptime_s", "store", "local", "mesh", "remote", "process", "namespaces",
    "transfers",
)  # fmt: skip


def _engines(namespaces: list[Any]) -> list[str]:
    """One ``engine`` line per engine that declared namespaces here (its tensor-parallel
    ranks folded into one line, with the ranks that said hello)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for ns in namespaces:
        if not isinstance(ns, dict):
            continue
        extra = ns.get("extra")
        pairs = extra.items() if isinstance(extra, dict) else ()
        extras = tuple(sorted((str(k), str(v)) for k, v in pairs))
        engine = (
            ns.get("model"), ns.get("dtype"), ns.get("layout"), ns.get("block_size"),
            ns.get("chunk_tokens"), ns.get("tp_size"), ns.get("cache_salt"), extras,
        )  # fmt: skip
        groups.setdefault(engine, []).append(ns.get("tp_rank", 0))
    lines = []
    for (model, dtype, layout, block, chunk, tp_size, salt, extras), ranks in groups.items():
        tp = ""
        if isinstance(tp_size, int) and tp_size > 1:
            have = ",".join(str(r) for r in sorted(ranks))
            tp = f", TP {tp_size} (ranks {have} seen)"
        salted = ", salted" if salt else ""
        named = "".join(f", {k} {v}" for k, v in extras)  # quantization, drafter
        shape = f"{dtype}, {layout}, block {block}, {chunk}-token chunks"
        lines.append(f"engine    {model} ({shape}{tp}{salted}{named})")
    return lines


def _lookups(local: dict[str, Any]) -> str:
    hits = local.get("lookup_hit_chunks") or {}
    rate = local.get("lookup_hit_rate")
    by_tier = ", ".join(f"{tier} {n}" for tier, n in hits.items())
    return (
        f"{local.get('lookups', 0)} lookups, chunk hit rate "
        f"{'-' if rate is None else f'{rate:.1%}'} (hits: {by_tier or 'none'}; "
        f"{local.get('lookup_miss_chunks', 0)} missed), "
        f"{local.get('protocol_errors', 0)} protocol errors"
    )


def _mesh(mesh: dict[str, Any]) -> str:
    digest = str(mesh.get("ring_digest", ""))
    line = (
        f"{mesh.get('address')} over {mesh.get('transport')}, "
        f"{mesh.get('alive_members')} members alive, ring {digest[:12]}, "
        f"incarnation {mesh.get('incarnation')}, {mesh.get('replicas')} replica(s), "
        f"{mesh.get('directory_keys')} keys in its directory"
    )
    errors = mesh.get("join_errors")
    if isinstance(errors, dict) and errors:
        line += "; ALONE, not joined through " + "; ".join(f"{k} ({v})" for k, v in errors.items())
    return line


def _transfers(t: dict[str, Any]) -> str:
    """Prefill/decode: what this node holds for decode nodes, what it received."""
    return (
        f"{t.get('held')} held for decode nodes ({t.get('pins')} chunks pinned; ended: "
        f"{t.get('released')} released, {t.get('expired')} expired, {t.get('evicted')} "
        f"evicted; {t.get('renewals')} renewals); {t.get('received')} received "
        f"({t.get('incomplete')} incomplete), {t.get('abandoned')} abandoned"
    )


def _process(process: dict[str, Any]) -> str:
    parts = [f"{process.get('tasks', '?')} tasks", f"{process.get('open_fds', '?')} open fds"]
    if "vmrss_bytes" in process:
        parts.append(
            f"rss {_num(process['vmrss_bytes'], 'bytes')} "
            f"(heap {_num(process.get('rssanon_bytes', 0), 'bytes')}, "
            f"arena pages {_num(process.get('rssshmem_bytes', 0), 'bytes')})"
        )
    if "malloc_in_use_bytes" in process:
        parts.append(
            f"malloc {_num(process['malloc_in_use_bytes'], 'bytes')} in use, "
            f"{_num(process.get('malloc_free_bytes', 0), 'bytes')} freed but kept"
        )
    kinds = process.get("task_kinds")
    if isinstance(kinds, dict) and kinds:
        parts.append("tasks by kind: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    return ", ".join(parts)


def _flat(value: Any) -> str:
    """A section this version does not know: ``key value`` pairs on one line."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_flat(v) if isinstance(v, dict | list) else _num(v, k)}"
                         for k, v in value.items())  # fmt: skip
    if isinstance(value, list):
        return "[" + ", ".join(_flat(v) for v in value) + "]"
    return _num(value)


def _table(tiers: dict[str, Any]) -> str:
    columns: list[str] = []
    for stats in tiers.values():
        if isinstance(stats, dict):
            columns.extend(c for c in stats if c not in columns and not isinstance(stats[c], dict))
    rows = [["tier", *columns]]
    for name, stats in tiers.items():
        stats = stats if isinstance(stats, dict) else {}
        rows.append([name, *(_num(stats.get(c, ""), c) for c in columns)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def fmt_bytes(n: int | None) -> str:
    """A byte count as ``meshkv status`` and ``meshkv ring status`` print it."""
    if n is None:
        return "-"
    if n >= 1 << 40:
        return f"{n / (1 << 40):.2f} TiB"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / (1 << 10):.1f} KiB" if n >= 1 << 10 else f"{n} B"


def _num(value: Any, name: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if "bytes" in name and isinstance(value, int):
        return fmt_bytes(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s"
