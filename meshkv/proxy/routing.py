"""Which engine serves a request in the proxy's aggregated mode.

Policies (``--routing``): ``least_loaded`` (fewest requests in flight, round robin among
equals), ``round_robin``, ``random``, ``sticky`` (a conversation stays on one engine while
that engine is within ``affinity_slack`` of the least loaded). A conversation is named by
the ``X-Conversation-Id`` / ``X-Session-Id`` header or the request's ``user`` field.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from meshkv.proxy.upstreams import Upstream, UpstreamPool

if TYPE_CHECKING:
    from meshkv.proxy.app import ProxyConfig
    from meshkv.proxy.metrics import ProxyMetrics

POLICIES = ("least_loaded", "round_robin", "random", "sticky")
CONVERSATION_HEADERS = ("X-Conversation-Id", "X-Session-Id")
MAX_CONVERSATIONS = 65536


def conversation_key(request: web.Request, body: dict[str, Any]) -> str | None:
    """The conversation a request belongs to, if the client names one."""
    for header in CONVERSATION_HEADERS:
        value = request.headers.get(header)
        if value:
            return value[:256]
    user = body.get("user")
    return user[:256] if isinstance(user, str) and user else None


class Router:
    """Chooses the engine of each request (aggregated mode)."""

    def __init__(
        self,
        config: ProxyConfig,
        pool: UpstreamPool,
        session: aiohttp.ClientSession,
        metrics: ProxyMetrics,
    ) -> None:
        self._config = config
        self._pool = pool
        self._session = session
        self._metrics = metrics
        self._rng = random.Random()
        self._next = 0
        self._sticky: dict[str, str] = {}

    async def choose(
        self, route: str, body: dict[str, Any], request: web.Request
    ) -> Upstream | None:
        policy = self._config.routing
        healthy = self._pool.healthy()
        if not healthy:
            return None
        if policy == "round_robin":
            self._next += 1
            self._metrics.route_choices.labels("round_robin").inc()
            return healthy[self._next % len(healthy)]
        if policy == "random":
            self._metrics.route_choices.labels("random").inc()
            return self._rng.choice(healthy)
        if policy == "sticky":
            conv = conversation_key(request, body)
            prefer = self._pool.by_url(self._sticky[conv]) if conv in self._sticky else None
            chosen = self._pool.least_loaded(prefer, self._config.affinity_slack)
            if chosen is not None and conv is not None:
                if len(self._sticky) >= MAX_CONVERSATIONS:
                    self._sticky.clear()
                self._sticky[conv] = chosen.url
            reason = "affinity" if chosen is not None and chosen is prefer else "load"
            self._metrics.route_choices.labels(reason).inc()
            return chosen
        self._metrics.route_choices.labels("load").inc()
        return self._pool.least_loaded()
