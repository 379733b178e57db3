"""The agent's HTTP admin API (aiohttp; loopback unless told otherwise).

``/healthz``, ``/metrics`` (Prometheus text), ``/v1/status`` (JSON), ``/v1/chunks/{key}``
(where one key is), ``POST /v1/prefix`` (how many leading tokens of a prompt this node
holds, by tier: what a cache-aware router asks), ``POST /v1/clear`` (bearer token). Other
parts add their own routes (the mesh adds ``/v1/ring`` …) by passing ``extra_routes`` to
``build_app``; ``status`` merges the dicts that ``status_sections`` callables return, so the
mesh can add a ``"mesh"`` section to ``/v1/status`` without touching this module.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meshkv import __version__
from meshkv.chunk import KEY_BYTES, ChunkKey
from meshkv.errors import ConfigError
from meshkv.heap import malloc_stats
from meshkv.metrics import AgentMetrics
from meshkv.server.local import plain
from meshkv.server.prefix import NamespaceRegistry, parse_query, query
from meshkv.store import Store

logger = logging.getLogger(__name__)

StatusSection = Callable[[], dict[str, Any]]


@dataclass(slots=True)
class AdminContext:
    """What the handlers need; built by the agent."""

    store: Store
    metrics: AgentMetrics
    node_id: str
    admin_token: str | None
    """Bearer token for mutating endpoints; None disables them."""
    started_at: float = field(default_factory=time.time)
    status_sections: list[StatusSection] = field(default_factory=list)
    """Extra ``/v1/status`` sections (e.g. the local server's connection count, the mesh)."""
    registry: NamespaceRegistry = field(default_factory=NamespaceRegistry)
    """The engines' namespaces (shared with the local server, which fills it)."""


CONTEXT = web.AppKey("meshkv_admin", AdminContext)


def build_app(ctx: AdminContext, extra_routes: Iterable[web.RouteDef] = ()) -> web.Application:
    """The admin application; ``extra_routes`` lets other parts (the mesh) add endpoints."""
    app = web.Application()
    app[CONTEXT] = ctx
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
            web.get("/v1/status", status),
            web.get("/v1/chunks/{key}", chunk),
            web.post("/v1/prefix", prefix),
            web.post("/v1/clear", clear),
        ]
    )
    app.add_routes(list(extra_routes))
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = generate_latest(ctx.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def status_document(ctx: AdminContext) -> dict[str, Any]:
    """The ``/v1/status`` JSON (also what ``meshkv status`` prints)."""
    doc: dict[str, Any] = {
        "node_id": ctx.node_id,
        "version": __version__,
        "uptime_s": round(time.time() - ctx.started_at, 3),
        "store": plain(ctx.store.snapshot()),
        "process": process_stats(),
        "namespaces": ctx.registry.describe(),
    }
    for section in ctx.status_sections:
        doc.update(section())
    return doc


def process_stats() -> dict[str, Any]:
    """What a leak would show: event-loop tasks (the most common coroutines among them),
    open file descriptors, and resident memory split into anonymous (heap: grows with
    leaks) and shared (the arena's touched pages), and what of the heap is Python's live
    objects and what glibc holds in use or freed (``meshkv.heap``)."""
    tasks = asyncio.all_tasks()
    kinds = Counter(getattr(t.get_coro(), "__qualname__", t.get_name()) for t in tasks)
    out: dict[str, Any] = {
        "pid": os.getpid(),
        "tasks": len(tasks),
        "task_kinds": dict(kinds.most_common(8)),
    }
    try:
        out["open_fds"] = len(os.listdir("/proc/self/fd"))
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("RssAnon", "RssShmem", "VmRSS"):
                    out[f"{name.lower()}_bytes"] = int(value.split()[0]) * 1024
    except OSError:  # not Linux: the numbers are simply absent
        pass
    # which part of the heap: Python's live objects (blocks), or glibc's (meshkv.heap)
    out["python_blocks"] = sys.getallocatedblocks()
    # objects freed only by the cycle collector: a heap that climbs and drops with the
    # full collections holds cyclic garbage between them
    stats = gc.get_stats()
    out["gc_full_collections"] = stats[-1]["collections"]
    out["gc_collected_objects"] = sum(s["collected"] for s in stats)
    out.update(malloc_stats())
    return out


async def status(request: web.Request) -> web.Response:
    return web.json_response(status_document(request.app[CONTEXT]))


async def chunk(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    raw = request.match_info["key"]
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        return _error(
            400, f"malformed key {raw!r}: expected {2 * KEY_BYTES} hex digits ({KEY_BYTES} bytes)"
        )
    info = ctx.store.describe(ChunkKey(key))
    if info is None:
        return _error(404, f"chunk {raw} is not stored on node {ctx.node_id}")
    return web.json_response({"key": raw, **plain(info)})


async def prefix(request: web.Request) -> web.Response:
    """``{"token_ids": [...], "model"?: str}`` -> ``{"node", "tokens", "chunk_tokens",
    "tiers": {"cpu", "ssd"}, "engines"}``: the longest prefix of the prompt held here."""
    ctx = request.app[CONTEXT]
    try:
        body = await request.json()
    except ValueError:
        return _error(400, 'the body must be JSON like {"token_ids": [1, 2, 3]}')
    try:
        tokens, model = parse_query(body)
    except ValueError as exc:
        return _error(400, str(exc))
    return web.json_response({"node": ctx.node_id, **query(ctx.store, ctx.registry, tokens, model)})


async def clear(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    if ctx.admin_token is None:
        return _error(
            403,
            "POST /v1/clear is disabled: start the agent with --admin-token-file FILE "
            "and send 'Authorization: Bearer <token>'",
        )
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return _error(401, "missing bearer token: send 'Authorization: Bearer <token>'", auth=True)
    if not hmac.compare_digest(token.strip().encode(), ctx.admin_token.encode()):
        return _error(403, "wrong admin token")
    removed = ctx.store.clear()
    logger.warning("admin cleared the store: %d chunks removed", removed)
    return web.json_response({"cleared": removed})


def _error(status: int, message: str, *, auth: bool = False) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="meshkv"'} if auth else None
    return web.json_response({"error": message}, status=status, headers=headers)


class AdminServer:
    """Runs the admin app on ``host:port`` (port 0: any free port; see ``address``)."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._host = host
        self._port = port
        self.address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:  # the port is taken, the address is not this host's, ...
            await self._runner.cleanup()
            raise ConfigError(
                f"cannot serve the admin HTTP on {self._host}:{self._port}: "
                f"{exc.strerror or exc}; pass a free --http HOST:PORT (port 0 picks one)"
            ) from exc
        host, port = self._runner.addresses[0][:2]
        self.address = (str(host), int(port))
        return self.address

    async def close(self) -> None:
        await self._runner.cleanup()
