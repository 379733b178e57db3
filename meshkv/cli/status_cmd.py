"""``meshkv status``: show a running agent's status (from its HTTP ``/v1/status``)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from meshkv.config import DEFAULT_HTTP_HOST, DEFAULT_HTTP_PORT, parse_host_port
from meshkv.errors import ConfigError


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "status",
        help="show a running agent's status",
        description="Print the status of the agent whose admin HTTP listens on --http.",
    )
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        default=f"{DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT}",
        help=f"agent admin address (default: {DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT})",
    )
    p.add_argument("--json", action="store_true", help="print the raw /v1/status JSON")
    p.add_argument(
        "--timeout", type=float, default=3.0, metavar="S", help="HTTP timeout (default: 3)"
    )
    p.set_defaults(func=run)


def fetch_status(address: str, timeout: float) -> dict[str, Any]:
    host, port = parse_host_port(address)
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{port}/v1/status"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        doc: dict[str, Any] = json.load(response)
    return doc


def run(args: argparse.Namespace) -> int:
    try:
        doc = fetch_status(args.http, args.timeout)
    except ConfigError as exc:
        print(f"meshkv status: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, urllib.error.URLError, ValueError) as exc:
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
    """A human table of a ``/v1/status`` document."""
    lines = [
        f"node      {doc.get('node_id')}  (meshkv {doc.get('version')}, "
        f"up {_duration(doc.get('uptime_s', 0.0))})"
    ]
    local = doc.get("local") or {}
    if local:
        lines.append(
            f"socket    {local.get('socket')}  ({local.get('connections')} connections, "
            f"arena {local.get('arena_name')})"
        )
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
    for section, value in doc.items():
        if section in ("node_id", "version", "uptime_s", "local", "store"):
            continue
        lines.append("")
        lines.append(f"{section}: {json.dumps(value, sort_keys=True)}")
    return "\n".join(lines)


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


def _num(value: Any, name: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if "bytes" in name and isinstance(value, int) and value >= 1 << 20:
        return (
            f"{value / (1 << 30):.2f} GiB" if value >= 1 << 30 else f"{value / (1 << 20):.1f} MiB"
        )
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s"
