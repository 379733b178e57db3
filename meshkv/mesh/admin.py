"""The mesh's HTTP admin routes: ``/v1/ring`` and ``/v1/owners``.

``GET /v1/ring[?stats=0]`` is this node's view of the mesh (``meshkv ring status`` prints it):
every remembered member with its state, incarnation and ring share, plus each live
member's chunk counts, bytes per tier and hit rate (asked of the member itself with
``NODE_STATS``, under a short deadline; a member that does not answer shows none), and the
ring's digest and balance. ``GET /v1/owners/{key}`` and ``POST /v1/owners {"keys": [hex]}``
show each key's home and the holders the home knows.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from meshkv.chunk import KEY_BYTES, ChunkKey
from meshkv.errors import MeshKVError

if TYPE_CHECKING:
    from meshkv.mesh.node import MeshNode

STATS_TIMEOUT_S = 0.5
"""How long ``/v1/ring`` waits for members' own numbers."""
MAX_OWNER_KEYS = 4096


def routes(node: MeshNode) -> list[web.RouteDef]:
    async def ring(request: web.Request) -> web.Response:
        with_stats = request.query.get("stats", "1") not in ("0", "false", "no")
        return web.json_response(await ring_view(node, with_stats=with_stats))

    async def owners_one(request: web.Request) -> web.Response:
        key = _parse_key(request.match_info["key"])
        (row,) = await owners(node, [key])
        return web.json_response(row)

    async def owners_many(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            raise web.HTTPBadRequest(text=f"body is not JSON: {exc}") from None
        keys = body.get("keys") if isinstance(body, dict) else None
        if not isinstance(keys, list) or len(keys) > MAX_OWNER_KEYS:
            raise web.HTTPBadRequest(text=f'expected {{"keys": [hex, ...]}} (<= {MAX_OWNER_KEYS})')
        parsed = [_parse_key(k) for k in keys]
        return web.json_response({"keys": await owners(node, parsed)})

    return [
        web.get("/v1/ring", ring),
        web.get("/v1/owners/{key}", owners_one),
        web.post("/v1/owners", owners_many),
    ]


def _parse_key(text: Any) -> ChunkKey:
    try:
        raw = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != KEY_BYTES:
        raise web.HTTPBadRequest(text=f"chunk key must be {2 * KEY_BYTES} hex digits: {text!r:.80}")
    return ChunkKey(raw)


async def ring_view(node: MeshNode, *, with_stats: bool = True) -> dict[str, Any]:
    """This node's view; ``with_stats=False`` skips asking members for their numbers
    (cheap enough to poll while a member is frozen)."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    ring = node.ring
    shares = ring.shares()
    rows: list[dict[str, Any]] = [
        {
            "id": node.node_id,
            "address": node.address,
            "state": "alive",
            "incarnation": node.incarnation,
            "last_heard_s": 0.0,
        }
    ]
    for m in node.known_members():
        heard = node.last_heard.get(m.node)
        rows.append(
            {
                "id": m.node,
                "address": m.addr,
                "state": m.state.name.lower(),
                "incarnation": m.incarnation,
                "last_heard_s": None if heard is None else round(now - heard, 3),
            }
        )
    deadline = now + STATS_TIMEOUT_S
    alive = [r for r in rows if r["state"] == "alive"] if with_stats else []
    numbers = await asyncio.gather(
        *(node.member_stats(r["id"], deadline) for r in alive), return_exceptions=True
    )
    by_id = {r["id"]: n for r, n in zip(alive, numbers, strict=True) if isinstance(n, dict)}
    for row in rows:
        row["ring_share"] = round(shares.get(row["id"], 0.0), 6)
        stats = by_id.get(row["id"])
        row["tiers"] = None if stats is None else stats["tiers"]
        row["chunks"] = None if stats is None else stats["chunks"]
        row["bytes"] = None if stats is None else stats["bytes"]
        row["hit_rate"] = None if stats is None else stats["hit_rate"]
    rows.sort(key=lambda r: r["id"])
    return {
        "self": node.node_id,
        "id_conflicts": list(node.id_conflicts),
        "members": rows,
        "ring": {
            "digest": ring.digest,
            "max_over_mean": round(ring.max_over_mean(), 6),
            "members": len(ring.members),
            "vnodes": node.config.ring.vnodes,
        },
    }


async def owners(node: MeshNode, keys: list[ChunkKey]) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + node.config.lookup_timeout_s * 4
    by_home: dict[str, list[ChunkKey]] = {}
    for key in keys:
        home = node.home_of(key)
        if home is not None:
            by_home.setdefault(home, []).append(key)
    holders: dict[ChunkKey, tuple[str, ...] | None] = {}
    for home, group in by_home.items():
        try:
            found = await node.lookup_at(home, group, deadline)
        except (MeshKVError, TimeoutError, OSError):
            found = tuple(None for _ in group)  # type: ignore[misc]
        holders.update(zip(group, found, strict=True))
    out = []
    for key in keys:
        known = holders.get(key)
        out.append(
            {
                "key": key.hex(),
                "home": node.home_of(key),
                "holders": sorted(known) if known is not None else [],
                "home_reachable": known is not None,
                "local": (node.store.describe(key) or {}).get("tiers", []),
            }
        )
    return out
