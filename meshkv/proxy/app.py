"""``meshkv proxy``: an OpenAI-compatible front for vLLM engines that use meshkv (``ROUTES``:
completions, chat, and vLLM's Anthropic Messages and OpenAI Responses APIs).

Two modes, one server (aiohttp):

* **Disaggregated** (``--prefill URL... --decode URL...``): each request goes first to a
  prefill engine (the least loaded) with ``max_tokens: 1``, ``stream: false`` and vLLM's
  standard ``kv_transfer_params`` (``do_remote_decode``), naming the decode engine's agent
  (``meshkv_push_to``) so the prefill's chunks are pushed there as they are saved; then the
  original request goes to the decode engine (the least loaded, or the one that served the
  conversation before) with the parameters the prefill returned. If the prefill fails, the
  decode engine computes the prompt itself (counted; ``--no-prefill-fallback`` turns that
  into an error). A batch of prompts runs one such flow per prompt (vLLM answers a
  batch with one prompt's parameters) and is answered as one, streamed or not; a request that
  reads no cache (prompt logprobs: vLLM computes it whole anyway) runs whole on a prefill
  engine.
* **Aggregated** (``--engines URL...``): each request goes to one engine, chosen by the
  router (``routing.py``): least loaded, round robin, random, or session-sticky.

Every field of a request the proxy does not own passes through unchanged (the proxy owns
``kv_transfer_params``, and ``max_tokens``/``stream`` of the prefill leg). Streaming answers
(SSE) are relayed chunk by chunk as they arrive. An upstream that fails or times out gives
the client an OpenAI-style error (502 / 504 with the upstream's message), never a hang; an
upstream that cannot be reached is taken out of rotation and put back once its
``/health`` answers. A client that hangs up ends its request on the engine (the
connection to it is closed, and vLLM aborts); on SIGTERM the proxy stops accepting and
lets requests in flight finish within ``--drain-seconds``, then answers those still running
with a 503 (or ends their stream with an error event). ``/health``, ``/v1/models``,
``/v1/upstreams`` (each engine's health, load and agent node) and ``/metrics``
(``meshkv_proxy_*``) are served too, and vLLM's routes that compute no completion
(``HELPERS``: ``/tokenize``, ``/v1/embeddings``, ...) are relayed to one engine (a
prefill engine in disaggregated mode). Every
request made for a client carries the client's ``Authorization`` header (engines with
vLLM's ``--api-key`` decide); the proxy's own requests carry ``upstream_api_key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest

from meshkv.proxy.answers import (
    ClientGone,
    UpstreamFailed,
    all_or_first_failure,
    error_response,
    prefill_body,
    stream_error,
    to_client,
)
from meshkv.proxy.batch import StreamJoin, batch_prompts, join_completions, pump_events
from meshkv.proxy.config import ProxyConfig
from meshkv.proxy.drain import Drain
from meshkv.proxy.metrics import ProxyMetrics
from meshkv.proxy.responses import VALID_ID, ResponseHolders, StreamScan, find_holder
from meshkv.proxy.routing import Router, conversation_key, reads_no_cache
from meshkv.proxy.upstreams import Upstream, UpstreamPool, client_auth, learn_node

logger = logging.getLogger(__name__)
T = TypeVar("T")

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/messages", "/v1/responses")
"""vLLM's routes that generate: OpenAI completions and chat, Anthropic's Messages API and
OpenAI's Responses API (vLLM passes ``kv_transfer_params`` through all four)."""
HELPERS = (
    "/tokenize", "/detokenize", "/version", "/v1/embeddings", "/pooling", "/classify",
    "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank", "/v1/messages/count_tokens",
)  # fmt: skip
"""vLLM server routes that compute no completion, passed unchanged to one engine (the
prefill pool's in disaggregated mode) so that a client needs only the proxy's address."""
STORED_ROUTE = "/v1/responses/{id}"
"""The ``route`` label of ``GET /v1/responses/{id}`` and its ``/cancel``."""
OTHER_ROUTE = "other"
"""The ``route`` label of everything else asked of the proxy (bounded label values)."""
INVALID = "invalid_request_error"
KEEPALIVE_S = 4.0
PROXY_KEY: web.AppKey[Proxy] = web.AppKey("proxy")
STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionResetError)
"""Errors of a pooled connection the server closed before it read our request: the
request never reached the engine, so it is sent again once on a fresh connection."""
UPSTREAM = "upstream_error"
STREAM_QUEUE_EVENTS = 256
"""Events of a streamed batch read from the engines ahead of the client, at most."""
NO_PARAMS_WARNING_S = 60.0
"""Least time between two warnings about one prefill engine that returns no parameters."""
MAX_CONVERSATIONS = 65536
"""Conversations whose decode engine is remembered (least recently seen dropped first)."""

CLIENT_CLOSED = 499
"""The status counted for a request whose client hung up before its answer was complete
(nginx's "client closed request"); the client never sees it."""


class Proxy:
    """The server's state: upstream pools, the router, metrics, the HTTP session."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        probe = config.disaggregated
        interval = config.health_interval_s
        self.pools: list[UpstreamPool] = []
        if config.disaggregated:
            self.prefill = UpstreamPool(
                "prefill", config.prefill, health_interval_s=interval, probe_nodes=False,
                api_key=config.upstream_api_key,
            )  # fmt: skip
            self.decode = UpstreamPool(
                "decode", config.decode, health_interval_s=interval, probe_nodes=probe,
                api_key=config.upstream_api_key,
            )  # fmt: skip
            self.pools = [self.prefill, self.decode]
        else:
            self.engines = UpstreamPool(
                "engine", config.engines, health_interval_s=interval, probe_nodes=False,
                api_key=config.upstream_api_key,
            )  # fmt: skip
            self.pools = [self.engines]
        self.metrics = ProxyMetrics(self.pools)
        self.router: Router | None = None
        self._conversations: OrderedDict[str, str] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        """Never pools: the retry after a pooled connection turned out closed."""
        self._tasks: list[asyncio.Task[None]] = []
        self.drain = Drain(config.drain_s)
        self.responses = ResponseHolders()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "proxy not started"
        return self._session

    async def start(self, app: web.Application) -> None:
        # Shorter than uvicorn's 5 s keep-alive (vLLM's server): a pooled connection the
        # server is about to close would fail the next request written on it.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=KEEPALIVE_S)
        self._session = aiohttp.ClientSession(connector=connector)
        self._fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        if not self.config.disaggregated:
            self.router = Router(self.config, self.engines, self.session, self.metrics)
        for pool in self.pools:
            self._tasks.append(asyncio.create_task(pool.run_health(self.session)))

    async def draining(self, app: web.Application) -> None:
        """SIGTERM (the runner's shutdown, after the listening socket closed)."""
        self._tasks.append(asyncio.create_task(self.drain.cut_at_deadline()))

    async def stop(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()

    # --- handlers -----------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        missing = [p.role for p in self.pools if not p.healthy()]
        if missing:
            return error_response(503, f"no healthy {' or '.join(missing)} upstream", "unavailable")
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        pool = self.decode if self.config.disaggregated else self.engines
        upstream = pool.least_loaded()
        if upstream is None:
            return error_response(503, f"no healthy {pool.role} upstream", "unavailable")
        try:
            timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout_s + 10)
            async with self.session.get(
                upstream.url + "/v1/models", timeout=timeout, headers=client_auth(request)
            ) as resp:
                body = await resp.read()
                return web.Response(body=body, status=resp.status, content_type="application/json")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            upstream.mark_down(str(exc))
            return error_response(502, f"upstream {upstream.url}: {exc}", "upstream_error")

    async def upstreams(self, request: web.Request) -> web.Response:
        """Every upstream: role, health, load, the agent node it uses, errors."""
        rows = [
            {
                "url": u.url,
                "role": u.role,
                "healthy": u.healthy,
                "inflight": u.inflight,
                "requests": u.requests,
                "node": u.node,
                "errors": dict(u.errors),
                "prefills_without_params": u.no_params,
                "last_error": u.last_error or None,
            }
            for pool in self.pools
            for u in pool.upstreams
        ]
        mode = "disaggregated" if self.config.disaggregated else "aggregated"
        return web.json_response({"mode": mode, "upstreams": rows})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def helper(self, request: web.Request) -> web.StreamResponse:
        """One of ``HELPERS``, relayed as it is to the least loaded engine; the answer
        comes back as the engine gave it. In disaggregated mode a prefill engine's (these
        compute prompts only, what prefill engines are for, and keep out of the decode
        engines' steps), a decode engine's when no prefill engine is healthy."""

        async def relay(started: float) -> web.StreamResponse:
            pools = [self.prefill, self.decode] if self.config.disaggregated else [self.engines]
            upstream = next((u for u in (p.least_loaded() for p in pools) if u), None)
            if upstream is None:
                roles = " or ".join(p.role for p in pools)
                return error_response(503, f"no healthy {roles} upstream", "unavailable")
            return await self._relay(upstream, request)

        return await self._counted(request.path, relay)

    async def not_served(self, request: web.Request) -> web.Response:
        """Any other path: an OpenAI-style 404 that says what the proxy serves."""
        self.metrics.requests.labels(OTHER_ROUTE, "404").inc()
        served = ", ".join(["/health", "/metrics", "/v1/models", "/v1/upstreams",
                            *ROUTES, *HELPERS, "/v1/responses/{id}[/cancel]"])  # fmt: skip
        return error_response(
            404, f"meshkv proxy serves no {request.method} {request.path}; it serves {served}",
            INVALID,
        )  # fmt: skip

    async def generate(self, request: web.Request) -> web.StreamResponse:
        route = request.path

        async def answer(started: float) -> web.StreamResponse:
            try:
                body = await request.json(loads=json.loads)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                return error_response(
                    400, f"request body is not JSON: {exc}", "invalid_request_error"
                )
            if not isinstance(body, dict):
                return error_response(
                    400, "request body must be a JSON object", "invalid_request_error"
                )
            if self.config.disaggregated:
                return await self._disaggregated(route, body, request, started)
            return await self._aggregated(route, body, request, started)

        return await self._counted(route, answer)

    async def _counted(
        self, route: str, handle: Callable[[float], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Run one client request's ``handle(started)``: a failed upstream gives its error
        answer, a client gone is 499; counted by route and status, and timed."""
        started = time.monotonic()
        status = 500
        task = asyncio.current_task()
        assert task is not None
        self.drain.enter(task)
        try:
            response = await handle(started)
            status = response.status
            return response
        except UpstreamFailed as exc:
            status = exc.response.status
            return exc.response
        except ClientGone as exc:
            status = CLIENT_CLOSED
            return exc.response
        except asyncio.CancelledError:
            if not self.drain.was_cut(task):
                # The client hung up (the runner cancels the handler then): leaving the
                # upstream call closes its connection, and vLLM aborts the request.
                status = CLIENT_CLOSED
                raise
            # Cut off at the drain deadline: the upstream call is left (vLLM aborts it),
            # and the client is told.
            task.uncancel()
            response = await self.drain.answer(task)
            status = 503
            return response
        finally:
            self.drain.leave(task)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - started)

    # --- modes --------------------------------------------------------------------------

    async def _disaggregated(
        self, route: str, body: dict[str, Any], request: web.Request, started: float
    ) -> web.StreamResponse:
        if reads_no_cache(route, body):
            # vLLM computes such a prompt whole wherever it runs, so a prefill leg would be
            # computed twice and its transfer thrown away. The request runs whole on a
            # prefill engine (there to compute prompts), which keeps it out of the decode
            # engines' steps; with none healthy it falls through to the decode engine.
            whole = self.prefill.least_loaded()
            if whole is not None:
                self.metrics.whole_on_prefill.inc()
                leg = {k: v for k, v in body.items() if k != "kv_transfer_params"}
                return await self._forward(whole, route, leg, request, started)
        prompts = batch_prompts(route, body)
        if prompts is not None:
            return await self._batch(route, body, prompts, request, started)
        holder = await self._holder(route, body, [self.decode], request)
        if holder is None and route == "/v1/responses" and body.get("background"):
            holder = self.decode.least_loaded()  # answered at once: nothing to prefill for
        if holder is not None:
            # A follow-up of a response stored on a decode engine: only that engine has
            # the conversation, so it runs whole there (a prefill engine would not find it).
            leg = {k: v for k, v in body.items() if k != "kv_transfer_params"}
            return await self._forward(holder, route, leg, request, started)
        decode, leg = await self._prefilled(route, body, request)
        return await self._forward(decode, route, leg, request, started)

    async def _prefilled(
        self, route: str, body: dict[str, Any], request: web.Request
    ) -> tuple[Upstream, dict[str, Any]]:
        """Choose the decode engine, run the prefill leg, and return the decode engine
        and its leg (with the prefill's parameters, or none: it computes the prompt)."""
        conv = conversation_key(request, body)
        decode = self.decode.least_loaded(self._remembered(conv), self.config.affinity_slack)
        if decode is None:
            raise UpstreamFailed(error_response(503, "no healthy decode upstream", "unavailable"))
        if conv is not None:
            self._remember(conv, decode.url)
        params: dict[str, Any] | None = None
        prefill = self.prefill.least_loaded()
        if prefill is None and not self.config.prefill_fallback:
            raise UpstreamFailed(error_response(503, "no healthy prefill upstream", "unavailable"))
        if prefill is not None:
            leg = prefill_body(route, body, decode.node)
            t0 = time.monotonic()
            try:
                answer = await self._call_json(
                    prefill, route, leg, self.config.prefill_timeout_s, client_auth(request)
                )
            except UpstreamFailed as exc:
                if not self.config.prefill_fallback:
                    raise
                logger.warning("prefill on %s failed (%s); the decode engine computes",
                               prefill.url, exc)  # fmt: skip
                self.metrics.fallbacks.inc()
            else:
                self.metrics.prefill.observe(time.monotonic() - t0)
                found = answer.get("kv_transfer_params")
                params = found if isinstance(found, dict) else None
                if params is None:
                    self._prefill_gave_no_params(prefill)
        else:
            self.metrics.fallbacks.inc()
        leg = dict(body)
        if params is not None:
            leg["kv_transfer_params"] = params
        else:
            leg.pop("kv_transfer_params", None)
        return decode, leg

    def _prefill_gave_no_params(self, prefill: Upstream) -> None:
        """A prefill engine answered without ``kv_transfer_params``: its prompt's KV goes
        nowhere and the decode engine computes the prompt again. A prefill engine started
        without a KV connector does this every time; meshkv's connector when its agent
        could not hold the KV (down, or no room). Counted, and said once a minute."""
        prefill.no_params += 1
        self.metrics.prefill_without_params.inc()
        now = time.monotonic()
        if now - prefill.warned_at >= NO_PARAMS_WARNING_S:
            prefill.warned_at = now
            logger.warning(
                "prefill engine %s answered without kv_transfer_params (%d times so far): the "
                "decode engine computes those prompts again. Is it started with "
                "--kv-transfer-config naming the meshkv connector (kv_role kv_producer or "
                "kv_both), and is its meshkv agent up with room (its log says why a save "
                "was skipped)?", prefill.url, prefill.no_params,
            )  # fmt: skip

    async def _batch(
        self,
        route: str,
        body: dict[str, Any],
        prompts: list[Any],
        request: web.Request,
        started: float,
    ) -> web.StreamResponse:
        """A batch of prompts, each through a P/D flow of its own, answered as one.

        vLLM answers a batch with one prompt's ``kv_transfer_params``: one prefill leg for
        the whole batch would leave every other prompt's transfer held on the producer
        until it expires, and those prompts' last partial chunks computed again. Each
        prompt's decode leg starts as soon as its own prefill has answered, so its KV is
        held on the producer only that long (not until the whole batch is prefilled) and
        the first prompts decode while the last prefill; at most ``batch_prefills``
        prefill legs run at once. The answers are joined as vLLM joins a batch's:
        choices in prompt order, numbered as vLLM numbers them (prompt ``i``'s ``j``-th
        choice is ``i * n + j``), usage summed; streamed, their events are relayed as they
        come with the indices rewritten."""
        gate = asyncio.Semaphore(self.config.batch_prefills)
        auth = client_auth(request)

        async def prefilled(prompt: Any) -> tuple[Upstream, dict[str, Any]]:
            async with gate:
                return await self._prefilled(route, {**body, "prompt": prompt}, request)

        if body.get("stream") is True:
            n = body.get("n")
            per_prompt = n if type(n) is int and n > 0 else 1
            return await self._stream_many(
                route, [prefilled(p) for p in prompts], per_prompt, request, started
            )

        async def answered(prompt: Any) -> dict[str, Any]:
            upstream, leg = await prefilled(prompt)
            answer = await self._call_json(upstream, route, leg, None, auth)
            learn_node(upstream, answer)
            return answer

        answers = await all_or_first_failure(answered(p) for p in prompts)
        return web.json_response(join_completions(answers))

    async def _stream_many(
        self,
        route: str,
        legs: list[Awaitable[tuple[Upstream, dict[str, Any]]]],
        per_prompt: int,
        request: web.Request,
        started: float,
    ) -> web.StreamResponse:
        """Open every leg's stream (each as soon as its prefill answered), then relay
        their events to the client as they come: choice indices moved to the prompt's
        place, one ``id``, the final usage events summed into one, one ``[DONE]`` at the
        end. A leg that fails before the stream began is the request's error answer."""
        auth = client_auth(request)
        opened: list[tuple[Upstream, aiohttp.ClientResponse] | None] = [None] * len(legs)
        pumps: list[asyncio.Task[None]] = []

        async def open_stream(i: int, leg: Awaitable[tuple[Upstream, dict[str, Any]]]) -> None:
            upstream, body = await leg
            upstream.inflight += 1
            upstream.requests += 1
            try:
                resp = await self._post(upstream, route, body, auth)
            except BaseException as exc:
                upstream.inflight -= 1
                if isinstance(exc, (aiohttp.ClientError, TimeoutError, OSError)):
                    raise self._failed(upstream, exc) from exc
                raise
            opened[i] = (upstream, resp)
            if resp.status >= 400:
                raise await self._upstream_error(upstream, resp)

        try:
            await all_or_first_failure(open_stream(i, leg) for i, leg in enumerate(legs))
            streams = [entry for entry in opened if entry is not None]
            response = web.StreamResponse(
                status=200,
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
            )
            await response.prepare(request)
            self.drain.streaming(route, response)
            # Bounded: a client that reads slowly slows the engines' streams down (TCP's
            # own back-pressure), instead of the proxy buffering their answers.
            events: asyncio.Queue[tuple[int, bytes | BaseException | None]] = asyncio.Queue(
                maxsize=STREAM_QUEUE_EVENTS
            )
            for i, (_, resp) in enumerate(streams):
                pumps.append(asyncio.create_task(pump_events(i, resp, events)))
            joiner = StreamJoin(per_prompt)
            live = len(streams)
            while live:
                i, item = await events.get()
                if item is None:
                    live -= 1
                    continue
                if isinstance(item, BaseException):
                    failure = self._failed(streams[i][0], item)
                    await to_client(response, stream_error(route, failure.response))
                    break
                out = joiner.event(i, item)
                if out is not None:
                    if joiner.first_content:
                        joiner.first_content = False
                        self.metrics.ttft.labels(route).observe(time.monotonic() - started)
                    await to_client(response, out)
            else:
                for out in joiner.close():
                    await to_client(response, out)
            await to_client(response, None)
            return response
        finally:
            for pump in pumps:
                pump.cancel()
            for entry in opened:
                if entry is not None:
                    entry[1].close()
                    entry[0].inflight -= 1

    async def _aggregated(
        self, route: str, body: dict[str, Any], request: web.Request, started: float
    ) -> web.StreamResponse:
        assert self.router is not None
        upstream = await self._holder(route, body, [self.engines], request)
        if upstream is None:
            upstream = await self.router.choose(route, body, request)
        if upstream is None:
            return error_response(503, "no healthy engine upstream", "unavailable")
        return await self._forward(upstream, route, body, request, started)

    async def _holder(
        self, route: str, body: dict[str, Any], pools: list[UpstreamPool], request: web.Request
    ) -> Upstream | None:
        """The healthy engine of ``pools`` that stored the response a Responses request
        follows (``previous_response_id``)."""
        if route != "/v1/responses":
            return None
        return await self._stored_on(body.get("previous_response_id"), pools, request)

    async def _stored_on(
        self, response_id: Any, pools: list[UpstreamPool], request: web.Request
    ) -> Upstream | None:
        """The healthy engine that holds response ``response_id``: the one that answered
        it through this proxy, else the one that says so when asked (``GET
        /v1/responses/{id}`` on every healthy engine at once: another replica of the proxy
        relayed it, or this one restarted since); None if none does."""
        if not isinstance(response_id, str) or not VALID_ID.fullmatch(response_id):
            return None
        url = self.responses.holder(response_id)
        if url is None:
            urls = [u.url for pool in pools for u in pool.healthy()]
            url = await find_holder(
                self.session, urls, response_id, self.config.connect_timeout_s,
                client_auth(request),
            )  # fmt: skip
            if url is None:
                return None
            self.responses.remember(response_id, url)
        upstream = next((u for pool in pools if (u := pool.by_url(url))), None)
        return upstream if upstream is not None and upstream.healthy else None

    async def stored_response(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/responses/{id}`` and ``POST .../cancel``: to the engine that holds
        that response (vLLM keeps it there), as they are."""

        async def relay(started: float) -> web.StreamResponse:
            response_id = request.match_info["response_id"]
            upstream = await self._stored_on(response_id, self.pools, request)
            if upstream is None:
                return error_response(
                    404, f"no healthy engine behind this proxy holds a response "
                    f"{response_id!r}", INVALID,
                )  # fmt: skip
            return await self._relay(upstream, request)

        return await self._counted(STORED_ROUTE, relay)

    def _remembered(self, conv: str | None) -> Upstream | None:
        if conv is None:
            return None
        url = self._conversations.get(conv)
        if url is None:
            return None
        self._conversations.move_to_end(conv)
        return self.decode.by_url(url)

    def _remember(self, conv: str, url: str) -> None:
        self._conversations[conv] = url
        self._conversations.move_to_end(conv)
        while len(self._conversations) > MAX_CONVERSATIONS:
            self._conversations.popitem(last=False)

    # --- upstream calls -----------------------------------------------------------------

    def _timeout(self, total: float | None = None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=total,
            sock_connect=self.config.connect_timeout_s,
            sock_read=self.config.request_timeout_s,
        )

    def _failed(self, upstream: Upstream, exc: BaseException) -> UpstreamFailed:
        if isinstance(exc, TimeoutError):
            upstream.count_error("timeout", str(exc))
            return UpstreamFailed(
                error_response(504, f"upstream {upstream.url} timed out", "upstream_timeout")
            )
        upstream.count_error("connect", str(exc))
        if isinstance(exc, aiohttp.ClientConnectorError):
            # It cannot even be connected to: out of rotation until /health answers. (A
            # reset of an open connection proves less; the health check decides then.)
            upstream.mark_down(f"{type(exc).__name__}: {exc}")
        return UpstreamFailed(
            error_response(502, f"upstream {upstream.url} failed: {exc}", "upstream_error")
        )

    async def _upstream_error(
        self, upstream: Upstream, resp: aiohttp.ClientResponse
    ) -> UpstreamFailed:
        """The upstream answered with an HTTP error: pass its answer on."""
        data = await resp.read()
        kind = "http_5xx" if resp.status >= 500 else "http_4xx"
        upstream.count_error(kind, data[:200].decode(errors="replace"))
        return UpstreamFailed(
            web.Response(body=data, status=resp.status, content_type="application/json")
        )

    async def _call_json(
        self,
        upstream: Upstream,
        route: str,
        body: dict[str, Any],
        total: float | None,
        headers: dict[str, str],
    ) -> dict[str, Any]:
        """POST ``body`` and return the answer's JSON object; ``total``: the whole call's
        limit (None: only the upstream's silence is limited, by ``request_timeout_s``)."""
        upstream.inflight += 1
        upstream.requests += 1
        try:
            for session in (self.session, self._fresh):
                assert session is not None
                try:
                    async with session.post(
                        upstream.url + route,
                        json=body,
                        timeout=self._timeout(total),
                        headers=headers,
                    ) as resp:
                        if resp.status >= 400:
                            raise await self._upstream_error(upstream, resp)
                        data: Any = await resp.json(content_type=None)
                    break
                except STALE:
                    if session is self._fresh:
                        raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._failed(upstream, exc) from exc
        except ValueError as exc:
            upstream.count_error("http_5xx", f"not JSON: {exc}")
            raise UpstreamFailed(
                error_response(502, f"upstream {upstream.url} sent no JSON", "upstream_error")
            ) from exc
        finally:
            upstream.inflight -= 1
        if not isinstance(data, dict):
            raise UpstreamFailed(
                error_response(
                    502, f"upstream {upstream.url} sent no JSON object", "upstream_error"
                )
            )
        return data

    async def _post(
        self, upstream: Upstream, route: str, body: dict[str, Any], headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """POST and return the response once its head arrived (retried once on a fresh
        connection when a pooled one turns out closed: the engine never saw the request)."""
        url = upstream.url + route
        try:
            return await self.session.post(url, json=body, timeout=self._timeout(), headers=headers)
        except STALE:
            assert self._fresh is not None
            return await self._fresh.post(url, json=body, timeout=self._timeout(), headers=headers)

    async def _forward(
        self,
        upstream: Upstream,
        route: str,
        body: dict[str, Any],
        request: web.Request,
        started: float,
    ) -> web.StreamResponse:
        """Send ``body`` to ``upstream`` and relay its answer (streamed when asked)."""
        stream = body.get("stream") is True
        upstream.inflight += 1
        upstream.requests += 1
        response: web.StreamResponse | None = None
        try:
            async with await self._post(upstream, route, body, client_auth(request)) as resp:
                if resp.status >= 400:
                    raise await self._upstream_error(upstream, resp)
                if not stream:
                    data = await resp.read()
                    with contextlib.suppress(ValueError):
                        learn_node(upstream, json.loads(data))
                    if route == "/v1/responses":
                        self.responses.learn(upstream.url, data)
                    return web.Response(
                        body=data, status=resp.status, content_type="application/json"
                    )
                response = web.StreamResponse(
                    status=resp.status,
                    headers={"Content-Type": resp.headers.get("Content-Type", "text/event-stream"),
                             "Cache-Control": "no-cache"},
                )  # fmt: skip
                await response.prepare(request)
                self.drain.streaming(route, response)
                first = True
                scan = None  # a Responses stream: learn which engine holds its response
                if route == "/v1/responses":
                    scan = StreamScan(self.responses, upstream.url)
                async for piece in resp.content.iter_any():
                    if scan is not None and not scan.done:
                        scan.feed(piece)
                    if first and b"data:" in piece:
                        first = False
                        self.metrics.ttft.labels(route).observe(time.monotonic() - started)
                    await to_client(response, piece)
                await to_client(response, None)
                return response
        except (UpstreamFailed, ClientGone):
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if response is not None and response.prepared:
                # Headers are out: tell the client in the stream itself, then end it.
                failure = self._failed(upstream, exc)
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await response.write(stream_error(route, failure.response))
                    await response.write_eof()
                return response
            raise self._failed(upstream, exc) from exc
        finally:
            upstream.inflight -= 1

    async def _relay(self, upstream: Upstream, request: web.Request) -> web.StreamResponse:
        """``request`` as it came (method, path, query, body, content type) to ``upstream``,
        and its answer back as it comes, whatever its status."""
        data = await request.read()
        headers = {
            "Content-Type": request.headers.get("Content-Type", "application/json"),
            **client_auth(request),
        }
        url = upstream.url + request.path_qs
        upstream.inflight += 1
        upstream.requests += 1
        response: web.StreamResponse | None = None
        try:
            async with self.session.request(
                request.method, url, data=data, headers=headers, timeout=self._timeout()
            ) as resp:
                if resp.status >= 500:
                    upstream.count_error("http_5xx", f"{request.path}: HTTP {resp.status}")
                response = web.StreamResponse(
                    status=resp.status,
                    headers={"Content-Type": resp.headers.get("Content-Type", "application/json")},
                )
                await response.prepare(request)
                async for piece in resp.content.iter_any():
                    await to_client(response, piece)
                await to_client(response, None)
                return response
        except ClientGone:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if response is not None and response.prepared:
                return response  # the answer was cut off: so is the client's copy
            raise self._failed(upstream, exc) from exc
        finally:
            upstream.inflight -= 1


def build_app(config: ProxyConfig) -> web.Application:
    proxy = Proxy(config)
    app = web.Application(client_max_size=config.max_body_bytes)
    app[PROXY_KEY] = proxy
    app.on_startup.append(proxy.start)
    app.on_shutdown.append(proxy.draining)
    app.on_cleanup.append(proxy.stop)
    app.add_routes(
        [
            web.get("/health", proxy.health),
            web.get("/v1/models", proxy.models),
            web.get("/metrics", proxy.prometheus),
            web.get("/v1/upstreams", proxy.upstreams),
            *(web.post(route, proxy.generate) for route in ROUTES),
            *(web.route("*", route, proxy.helper) for route in HELPERS),
            web.get("/v1/responses/{response_id}", proxy.stored_response),
            web.post("/v1/responses/{response_id}/cancel", proxy.stored_response),
            web.route("*", "/{path:.*}", proxy.not_served),
        ]
    )
    return app
