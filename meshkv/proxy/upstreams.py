"""The engines behind ``meshkv proxy``: health, load and which agent each one uses.

Every upstream is an OpenAI-compatible server (a vLLM engine). The pool knows, per upstream:

* **healthy** — out of rotation after a failed request or health check (connection refused
  or reset, timeout), back in once its ``/health`` answers 200 again (checked every
  ``health_interval_s``; an unhealthy one is checked as often);
* **in flight** — requests the proxy has running there (the load it balances on);
* **node** — the node id of the meshkv agent the engine's connector talks to, learned from
  the engine itself: a one-token probe request whose ``kv_transfer_params`` ask for it
  (``{"meshkv_probe": true}``, answered by the connector's ``request_finished``), and from
  every decode answer that carries ``meshkv_node``. A prefill engine pushes a transfer's
  chunks to that node, so the decode engine finds them local.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 30.0
"""Longest a node-id probe (one one-token request) may take."""


@dataclass(slots=True, eq=False)
class Upstream:
    """One engine the proxy forwards to."""

    url: str
    """Base URL, e.g. ``http://10.0.0.5:8000``."""
    role: str
    """``prefill``, ``decode`` or ``engine`` (aggregated)."""
    healthy: bool = True
    inflight: int = 0
    requests: int = 0
    """Requests sent here (for the load spread)."""
    node: str | None = None
    """Node id of the engine's meshkv agent, once known."""
    model: str | None = None
    """The first model the engine serves (``/v1/models``), once known."""
    errors: dict[str, int] = field(default_factory=dict)
    """Failed requests by kind: ``connect``, ``timeout``, ``http_5xx``, ``http_4xx``."""
    last_error: str = ""
    down_since: float | None = None
    no_params: int = 0
    """Prefill answers that carried no ``kv_transfer_params`` (no KV connector there?)."""
    warned_at: float = -math.inf
    """When the last rate-limited warning about this upstream was logged."""

    @property
    def name(self) -> str:
        return self.url.removeprefix("http://").removeprefix("https://")

    def count_error(self, kind: str, message: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = message

    def mark_down(self, reason: str) -> None:
        if self.healthy:
            logger.warning("upstream %s (%s) out of rotation: %s", self.url, self.role, reason)
            self.down_since = time.monotonic()
        self.healthy = False

    def mark_up(self) -> None:
        if not self.healthy:
            logger.info("upstream %s (%s) back in rotation", self.url, self.role)
        self.healthy = True
        self.down_since = None


class UpstreamPool:
    """All upstreams of one role; the health loop and probes for node ids."""

    def __init__(
        self,
        role: str,
        urls: Iterable[str],
        *,
        health_interval_s: float,
        probe_nodes: bool,
        api_key: str | None = None,
    ) -> None:
        self.role = role
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        """For the pool's own requests (model name, node probe)."""
        self.upstreams = [Upstream(u.rstrip("/"), role) for u in urls]
        if not self.upstreams:
            raise ValueError(f"no {role} upstreams")
        self._interval = health_interval_s
        self._probe = probe_nodes
        self._probing: set[Upstream] = set()
        self._rr = 0

    def healthy(self) -> list[Upstream]:
        return [u for u in self.upstreams if u.healthy]

    def least_loaded(self, prefer: Upstream | None = None, slack: int = 0) -> Upstream | None:
        """The healthy upstream with the fewest requests in flight (round robin among
        equals); ``prefer`` wins when it is within ``slack`` of the least loaded."""
        candidates = self.healthy()
        if not candidates:
            return None
        low = min(u.inflight for u in candidates)
        if prefer is not None and prefer.healthy and prefer.inflight <= low + slack:
            return prefer
        best = [u for u in candidates if u.inflight == low]
        self._rr += 1
        return best[self._rr % len(best)]

    def by_url(self, url: str) -> Upstream | None:
        for upstream in self.upstreams:
            if upstream.url == url:
                return upstream
        return None

    async def check(self, session: aiohttp.ClientSession, upstream: Upstream) -> bool:
        """One health check: ``/health`` answers 200 within the interval."""
        try:
            timeout = aiohttp.ClientTimeout(total=max(1.0, self._interval))
            async with session.get(upstream.url + "/health", timeout=timeout) as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            upstream.mark_down(f"health check: {type(exc).__name__}: {exc}")
            return False
        if ok:
            upstream.mark_up()
        else:
            upstream.mark_down(f"/health answered {resp.status}")
        return ok

    async def run_health(self, session: aiohttp.ClientSession) -> None:
        """Check every upstream every interval; probe node ids of healthy ones."""
        while True:
            await asyncio.gather(*(self.check(session, u) for u in self.upstreams))
            if self._probe:
                for upstream in self.upstreams:
                    if upstream.healthy and upstream.node is None and upstream not in self._probing:
                        self._probing.add(upstream)
                        task = asyncio.create_task(self._probe_node(session, upstream))
                        task.add_done_callback(functools.partial(self._probed, upstream))
            await asyncio.sleep(self._interval)

    def _probed(self, upstream: Upstream, task: asyncio.Task[None]) -> None:
        self._probing.discard(upstream)

    async def model_of(self, session: aiohttp.ClientSession, upstream: Upstream) -> str | None:
        if upstream.model is None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
                timeout = aiohttp.ClientTimeout(total=10)
                async with session.get(
                    upstream.url + "/v1/models", timeout=timeout, headers=self._headers
                ) as resp:
                    data: Any = await resp.json()
                upstream.model = str(data["data"][0]["id"])
        return upstream.model

    async def _probe_node(self, session: aiohttp.ClientSession, upstream: Upstream) -> None:
        """Ask the engine which meshkv agent it uses (a one-token request)."""
        model = await self.model_of(session, upstream)
        if model is None:
            return
        body = {
            "model": model,
            "prompt": [1],
            "max_tokens": 1,
            "temperature": 0,
            "kv_transfer_params": {"meshkv_probe": True},
        }
        try:
            timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
            async with session.post(
                upstream.url + "/v1/completions", json=body, timeout=timeout, headers=self._headers
            ) as resp:
                data: Any = await resp.json()
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            logger.info("probe of %s failed: %s", upstream.url, exc)
            return
        learn_node(upstream, data)


def client_auth(request: web.Request) -> dict[str, str]:
    """The client's credentials for the engines: its ``Authorization`` header, passed on
    to every upstream request made for it (vLLM's ``--api-key`` checks it)."""
    value = request.headers.get("Authorization")
    return {"Authorization": value} if value else {}


def learn_node(upstream: Upstream, response: Any) -> None:
    """Remember the agent node an engine's answer names (``kv_transfer_params``)."""
    if not isinstance(response, dict):
        return
    params = response.get("kv_transfer_params")
    node = params.get("meshkv_node") if isinstance(params, dict) else None
    if isinstance(node, str) and node and node != upstream.node:
        logger.info("upstream %s uses meshkv agent %s", upstream.url, node)
        upstream.node = node
