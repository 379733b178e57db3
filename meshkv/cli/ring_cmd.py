"""``meshkv ring status|owners``: the mesh as one agent sees it, over its HTTP admin port.

``ring status`` prints the members (id, address, state, incarnation, ring share, chunks
and bytes per tier, hit rate, last heard), the ring's balance and digest, and which node
answered. ``--json`` prints exactly::

    {"self": ID, "members": [{"id", "address", "state", "incarnation", "ring_share",
      "chunks", "bytes"}], "ring": {"digest", "max_over_mean"},
     "id_conflicts": [{"message", "at_s"}]}

``id_conflicts`` lists refused handshakes with agents that claim this node's id (empty in a
healthy mesh; see docs/agent.md, Node identity).

Every agent that sees the same members reports the same ``ring.digest``.
``ring owners KEY`` (32 hex digits) or ``--tokens FILE`` prints each key's home and holders.
The tokens file is JSON: ``{"namespace": {Namespace fields}, "chunk_tokens": 256,
"tokens": [ids]}``; the keys of its full chunks are computed here, as an engine would.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from meshkv.chunk import ChunkKey, Namespace, chunk_keys
from meshkv.cli.status_cmd import LOCAL_AGENT, admin_url, fetch_status, fmt_bytes
from meshkv.errors import MeshKVError

MEMBER_FIELDS = ("id", "address", "state", "incarnation", "ring_share", "chunks", "bytes")
RING_FIELDS = ("digest", "max_over_mean")
HTTP_TIMEOUT_S = 5.0
HTTP_HELP = f"any agent's admin address; the mesh looks the same from each (default: {LOCAL_AGENT})"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("ring", help="inspect the mesh's ring")
    verbs = p.add_subparsers(dest="ring_command", metavar="VERB", required=True)

    st = verbs.add_parser("status", help="members, their state and the ring's balance")
    st.add_argument("--http", default=LOCAL_AGENT, metavar="HOST:PORT", help=HTTP_HELP)
    st.add_argument("--json", action="store_true", help="print the JSON contract")
    st.set_defaults(func=_status)

    ow = verbs.add_parser("owners", help="home and holders of chunk keys")
    ow.add_argument("--http", default=LOCAL_AGENT, metavar="HOST:PORT", help=HTTP_HELP)
    ow.add_argument("key", nargs="?", help="chunk key, 32 hex digits")
    ow.add_argument("--tokens", metavar="FILE", help='JSON {"namespace", "chunk_tokens", "tokens"}')
    ow.add_argument("--json", action="store_true", help="print JSON")
    ow.set_defaults(func=_owners)


def _get(http: str, path: str, body: Any = None) -> Any:
    try:
        base = admin_url(http)
    except MeshKVError as exc:  # a bad flag: exit 2, as argparse's own refusals
        print(f"meshkv ring: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    url = base + path
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404 and path.startswith(("/v1/ring", "/v1/owners")):
            if _is_agent(http):
                raise SystemExit(
                    f"meshkv ring: the agent at {http} runs without a mesh (start it with --listen)"
                ) from None
            raise SystemExit(
                f"meshkv ring: {http} is not a meshkv agent's admin address (GET {path} "
                "answered 404 and /v1/status names no node); pass the agent's --http"
            ) from None
        detail = exc.read().decode(errors="replace").strip()
        raise SystemExit(f"meshkv ring: {url} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SystemExit(f"meshkv ring: error: no agent answering at {base} ({reason})") from None
    except ValueError:  # 200 but not JSON: some other HTTP server
        raise SystemExit(
            f"meshkv ring: {http} is not a meshkv agent's admin address (GET {path} did not "
            "answer JSON); pass the agent's --http"
        ) from None


def _is_agent(http: str) -> bool:
    """Whether ``http`` answers ``/v1/status`` as an agent does (a JSON map with a node id)."""
    try:
        fetch_status(http, HTTP_TIMEOUT_S)
    except (OSError, ValueError, MeshKVError):
        return False
    return True


def contract(view: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` contract cut out of the agent's richer ``/v1/ring`` answer."""
    return {
        "self": view["self"],
        "members": [{f: m.get(f) for f in MEMBER_FIELDS} for m in view["members"]],
        "ring": {f: view["ring"].get(f) for f in RING_FIELDS},
        "id_conflicts": list(view.get("id_conflicts", [])),
    }


def _status(args: argparse.Namespace) -> int:
    view = _get(args.http, "/v1/ring")
    if args.json:
        print(json.dumps(contract(view), indent=2))
        return 0
    print(render_status(view))
    return 0


def render_status(view: dict[str, Any]) -> str:
    head = (
        "",
        "node",
        "address",
        "state",
        "inc",
        "share",
        "chunks cpu/ssd",
        "bytes cpu/ssd",
        "hit rate",
        "last heard",
    )
    rows: list[tuple[str, ...]] = [head]
    for m in view["members"]:
        tiers = m.get("tiers") or {}
        cpu, ssd = tiers.get("cpu") or {}, tiers.get("ssd") or {}
        hit = m.get("hit_rate")
        heard = m.get("last_heard_s")
        rows.append(
            (
                "*" if m["id"] == view["self"] else "",
                m["id"],
                m["address"],
                m["state"],
                str(m["incarnation"]),
                f"{100 * m['ring_share']:.1f}%",
                f"{cpu.get('chunks', '-')}/{ssd.get('chunks', '-')}" if tiers else "-",
                f"{fmt_bytes(cpu.get('bytes'))}/{fmt_bytes(ssd.get('bytes'))}" if tiers else "-",
                "-" if hit is None else f"{100 * hit:.1f}%",
                "-" if heard is None else f"{heard:.1f}s ago",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    ring = view["ring"]
    lines.append("")
    lines.append(
        f"ring: {ring.get('members', len(view['members']))} members on the ring, "
        f"{ring.get('vnodes', '?')} vnodes each, max/mean ownership "
        f"{ring['max_over_mean']:.3f}, digest {ring['digest']}"
    )
    lines.append(f"view of {view['self']} (*)")
    for c in view.get("id_conflicts", []):
        lines.append(f"NODE ID CONFLICT ({c['at_s']:.0f} s after start): {c['message']}")
    return "\n".join(lines)


def keys_from_tokens_file(path: Path) -> list[ChunkKey]:
    """Chunk keys of the prompt described by a ``--tokens`` file."""
    spec = json.loads(path.read_text())
    if not isinstance(spec, dict) or not {"namespace", "tokens"} <= spec.keys():
        raise ValueError('expected {"namespace": {...}, "chunk_tokens": N, "tokens": [...]}')
    tokens = spec["tokens"]
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise ValueError("tokens must be a list of integers")
    namespace = Namespace(**spec["namespace"])
    return chunk_keys(namespace.digest(), tokens, int(spec.get("chunk_tokens", 256)))


def _owners(args: argparse.Namespace) -> int:
    if bool(args.key) == bool(args.tokens):
        print("meshkv ring owners: give exactly one of KEY or --tokens FILE", file=sys.stderr)
        return 2
    if args.key:
        try:
            if len(bytes.fromhex(args.key)) != 16:
                raise ValueError
        except ValueError:
            print(f"meshkv ring owners: {args.key!r} is not 32 hex digits", file=sys.stderr)
            return 2
        rows = [_get(args.http, f"/v1/owners/{args.key}")]
    else:
        try:
            keys = keys_from_tokens_file(Path(args.tokens))
        except (OSError, ValueError, TypeError) as exc:
            print(f"meshkv ring owners: {args.tokens}: {exc}", file=sys.stderr)
            return 2
        rows = _get(args.http, "/v1/owners", {"keys": [k.hex() for k in keys]})["keys"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        holders = ", ".join(row["holders"]) or "(none)"
        print(f"{row['key']}  home {row['home']}  holders {holders}")
    return 0
