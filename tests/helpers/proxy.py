"""Scripted OpenAI-ish engines and an in-process ``meshkv proxy`` for the proxy's tests
(``tests/integration/test_proxy.py``, ``test_prefix_query.py``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from meshkv.launch import free_port
from meshkv.proxy.app import build_app
from meshkv.proxy.config import ProxyConfig
from meshkv.proxy.serve import make_runner


def run(main: Callable[[], Awaitable[None]], limit: float = 30.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(limit):
            await main()

    asyncio.run(bounded())


@dataclass
class FakeEngine:
    """An OpenAI-ish server that records what it is sent."""

    name: str
    node: str | None = None
    delay: float = 0.0
    fail_status: int | None = None
    seen: list[dict[str, Any]] = field(default_factory=list)
    healthy: bool = True
    stream_chunks: int = 3
    chunk_delay: float = 0.01
    """Seconds between the events of a streamed answer."""
    abandoned: list[str] = field(default_factory=list)
    """Where a request was when the proxy closed its connection (vLLM aborts it then)."""
    transfers: bool = True
    """False: like an engine with no KV connector, answer no ``kv_transfer_params``."""
    api_key: str | None = None
    """Like vLLM's ``--api-key``: every /v1 path needs ``Authorization: Bearer <key>``."""
    auths: list[tuple[str, str | None]] = field(default_factory=list)
    """(path, Authorization header) of every request."""
    seen_at: list[float] = field(default_factory=list)
    """``time.monotonic()`` at each request of ``seen``."""
    busy: int = 0
    """Completions requests being answered now; ``peak_busy`` the most at once."""
    peak_busy: int = 0
    stored: dict[str, Any] = field(default_factory=dict)
    """Responses-API answers by id, as vLLM's response store keeps them."""
    runner: web.AppRunner | None = None

    @web.middleware
    async def guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        self.auths.append((request.path, auth))
        if self.api_key and request.path.startswith("/v1") and auth != f"Bearer {self.api_key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"tokens": [1, 2, 3], "echo": body,
                                  "query": dict(request.query)})  # fmt: skip

    url: str = ""

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(body)
        self.seen_at.append(time.monotonic())
        self.busy += 1
        self.peak_busy = max(self.peak_busy, self.busy)
        try:
            return await self._answer(request, body)
        finally:
            self.busy -= 1

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.abandoned.append("waiting")
            raise
        if self.fail_status is not None:
            return web.json_response({"error": {"message": f"{self.name} broke"}},
                                     status=self.fail_status)  # fmt: skip
        params = body.get("kv_transfer_params") or {}
        out: dict[str, Any] = {
            "choices": [{"index": 0, "text": f"{self.name}-answer", "prompt": body.get("prompt")}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        }
        name = f"{self.name}-{len(self.seen)}"  # like vLLM: one id per request
        if request.path == "/v1/responses":  # like vLLM with its response store on
            previous = body.get("previous_response_id")
            if previous is not None and previous not in self.stored:
                return web.json_response({"error": {"message": f"{previous} not found"}},
                                         status=404)  # fmt: skip
            name = out["id"] = f"resp_{self.name}{len(self.seen)}"
            self.stored[name] = out
        if params.get("do_remote_decode") and self.transfers:
            meshkv = {"from": self.name, "prompt": body.get("prompt")}
            out["kv_transfer_params"] = {"do_remote_prefill": True, "meshkv": meshkv}
        elif self.node is not None and (params.get("meshkv_probe") or params.get("meshkv")):
            out["kv_transfer_params"] = {"meshkv_node": self.node}
        if not body.get("stream"):
            return web.json_response(out)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            n = body.get("n") or 1
            for i in range(self.stream_chunks):
                for j in range(n):
                    choice = {"index": j, "text": f"{body.get('prompt')}-t{i}"}
                    chunk = {"id": name, "choices": [choice]}
                    await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await asyncio.sleep(self.chunk_delay)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 5, "completion_tokens": 3 * n, "total_tokens": 5 + 3 * n}
                chunk = {"id": name, "choices": [], "usage": usage}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        except (asyncio.CancelledError, ConnectionError):
            self.abandoned.append("streaming")
            raise
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def stored_response(self, request: web.Request) -> web.Response:
        rid = request.match_info["rid"]
        if rid not in self.stored:
            return web.json_response({"error": {"message": f"{rid} not found"}}, status=404)
        return web.json_response({**self.stored[rid], "served_by": self.name})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok", status=200 if self.healthy else 503)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "tiny"}]})

    async def start(self) -> FakeEngine:
        app = web.Application(middlewares=[self.guard])
        app.add_routes(
            [
                web.post("/tokenize", self.tokenize),
                web.post("/v1/embeddings", self.tokenize),
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.completions),
                web.post("/v1/messages", self.completions),
                web.post("/v1/responses", self.completions),
                web.post("/v1/messages/count_tokens", self.tokenize),
                web.get("/v1/responses/{rid}", self.stored_response),
                web.post("/v1/responses/{rid}/cancel", self.stored_response),
                web.get("/health", self.health),
                web.get("/v1/models", self.models),
            ]
        )
        # Like vLLM's server, stop working on a request whose connection closed.
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@asynccontextmanager
async def proxy(**config: Any) -> AsyncIterator[str]:
    cfg = ProxyConfig(port=free_port(), health_interval_s=0.1, **config)
    runner = make_runner(build_app(cfg), cfg.drain_s)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", cfg.port).start()
    try:
        yield f"http://127.0.0.1:{cfg.port}"
    finally:
        await runner.cleanup()


async def post(url: str, body: Any, **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body, **kw) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except json.JSONDecodeError:
            return resp.status, text


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.02)


def sse_events(raw: bytes) -> list[Any]:
    """The JSON events of an SSE answer, and "[DONE]" where it came."""
    out: list[Any] = []
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: "):
            payload = event[6:]
            out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json(content_type=None)
