"""Which engine serves a request in the proxy's aggregated mode.

Policies (``--routing``): ``least_loaded`` (fewest requests in flight, round robin among
equals), ``round_robin``, ``random``, ``sticky`` (a conversation stays on one engine while
that engine is within ``affinity_slack`` of the least loaded), and ``cache_aware``. A
conversation is named by the ``X-Conversation-Id`` / ``X-Session-Id`` header or the
request's ``user`` field.

**cache_aware** (needs ``--agents``, one meshkv agent admin URL per engine). Per request the
proxy takes the prompt's token ids (given, or from the engine's ``/tokenize``), asks every
healthy engine's agent ``POST /v1/prefix`` in parallel (``prefix_timeout_s``; an agent that
does not answer in time counts as holding nothing) and picks the engine of least cost::

    cost_i = (1 - h_i / P) + load_weight * L_i

``P`` the prompt's tokens, ``h_i`` the tokens engine ``i``'s node holds (CPU tier, plus SSD
tokens at ``ssd_weight``: a disk read is cheaper than compute, dearer than memory), ``L_i``
its requests in flight. The unit is one prompt's prefill: a request in flight is counted as
about one prompt of work ahead of this one, so with ``load_weight`` 1 a full cache hit is
worth exactly one queued request. This is Dynamo's KV router cost (``overlap weight x
prefill blocks + active blocks``) with both terms in prompts instead of blocks. **Bounded
load**: only engines with ``L_i + 1 <= ceil((1 + balance_slack) * (sum(L) + 1) / n)`` are
candidates, i.e. whose load with this request stays within the bound (consistent hashing
with bounded loads, Mirrokni et al.), so one hot prefix cannot pin every request to one
engine. Bounding requests in flight is not enough when hits make one engine's requests
short: it finishes them sooner, gets more, and served 50 of 64 requests in ``bench route``.
So the same bound also holds over the last ``balance_window`` (64) routed requests:
``R_i + 1 <= ceil((1 + balance_slack) * (sum(R) + 1) / n)``. SGLang's router gets the
same effect with its absolute and relative balance thresholds, switching to least-loaded
when load is skewed. Ties go to the
conversation's previous engine (session affinity), then round robin.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from meshkv.proxy.upstreams import Upstream, UpstreamPool, client_auth

if TYPE_CHECKING:
    from meshkv.proxy.config import ProxyConfig
    from meshkv.proxy.metrics import ProxyMetrics

logger = logging.getLogger(__name__)

POLICIES = ("least_loaded", "round_robin", "random", "sticky", "cache_aware")
CONVERSATION_HEADERS = ("X-Conversation-Id", "X-Session-Id")
MAX_CONVERSATIONS = 65536


def conversation_key(request: web.Request, body: dict[str, Any]) -> str | None:
    """The conversation a request belongs to, if the client names one."""
    for header in CONVERSATION_HEADERS:
        value = request.headers.get(header)
        if value:
            return value[:256]
    user = body.get("user")
    if not isinstance(user, str):
        metadata = body.get("metadata")  # Anthropic's Messages API names its user there
        user = metadata.get("user_id") if isinstance(metadata, dict) else None
    return user[:256] if isinstance(user, str) and user else None


def chat_messages(route: str, body: dict[str, Any]) -> list[Any] | None:
    """A request's conversation as chat messages, for ``/tokenize`` (which applies the
    engine's chat template): chat's ``messages``; Anthropic's with its ``system`` first;
    a Responses ``input`` (a text, or message items whose content is text) after its
    ``instructions``. None when it cannot be said that way (the request is then routed
    by load alone)."""
    if route == "/v1/chat/completions":
        messages = body.get("messages")
        return messages if isinstance(messages, list) else None
    if route == "/v1/messages":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        system = body.get("system")
        if isinstance(system, list):  # text blocks, joined as vLLM joins them: without
            # Claude Code's per-request billing header, which vLLM drops
            texts = [
                b.get("text") for b in system if isinstance(b, dict) and b.get("type") == "text"
            ]
            system = "".join(
                t for t in texts
                if isinstance(t, str) and not t.startswith("x-anthropic-billing-header")
            )  # fmt: skip
        head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
        return head + messages
    if route == "/v1/responses":
        items = body.get("input")
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        if not isinstance(items, list) or not all(
            isinstance(i, dict)
            and isinstance(i.get("role"), str)
            and isinstance(i.get("content"), str)
            for i in items
        ):
            return None
        instructions = body.get("instructions")
        head = (
            [{"role": "system", "content": instructions}] if isinstance(instructions, str) else []
        )
        return head + [{"role": i["role"], "content": i["content"]} for i in items]
    return None


def reads_no_cache(route: str, body: dict[str, Any]) -> bool:
    """Whether vLLM computes this request's whole prompt whatever any cache holds: it
    asks for prompt logprobs (every prompt token's logits), given as ``prompt_logprobs``
    or, as vLLM maps them, ``echo`` with ``logprobs`` (completions) or ``top_logprobs``
    (chat, where an absent or null one is 0: any chat ``echo``). vLLM then skips reading
    its prefix cache and any connector's hits. (``tests/vllm/test_pd.py`` checks this
    rule against the engine.)"""
    if body.get("prompt_logprobs") is not None:
        return True
    if not body.get("echo"):
        return False
    return route == "/v1/chat/completions" or body.get("logprobs") is not None


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
        self._recent: collections.deque[str] = collections.deque()
        """URLs of the engines the last ``balance_window`` cache-aware requests went to."""
        self._recent_counts: collections.Counter[str] = collections.Counter()
        self._agents = dict(zip(pool.upstreams, config.agents, strict=False))
        """Each engine's agent admin URL (cache-aware routing)."""

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
        if policy == "cache_aware":
            return await self._cache_aware(route, body, request, healthy)
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

    # --- cache-aware ---------------------------------------------------------------------

    def _remember(self, conv: str | None, chosen: Upstream) -> None:
        if conv is None:
            return
        if len(self._sticky) >= MAX_CONVERSATIONS:
            self._sticky.clear()
        self._sticky[conv] = chosen.url

    async def _cache_aware(
        self, route: str, body: dict[str, Any], request: web.Request, healthy: list[Upstream]
    ) -> Upstream:
        if reads_no_cache(route, body):
            # vLLM computes it whole wherever it goes: what an engine holds is no reason,
            # and the prefix queries would only delay it.
            self._metrics.route_choices.labels("no_cache").inc()
            return self._pool.least_loaded() or healthy[0]
        cfg = self._config
        conv = conversation_key(request, body)
        previous = self._pool.by_url(self._sticky[conv]) if conv in self._sticky else None
        tokens = await self._prompt_tokens(route, body, healthy, client_auth(request))
        if tokens:
            held = await asyncio.gather(*(self._held(u, tokens) for u in healthy))
        else:
            held = [0.0] * len(healthy)
        total = sum(u.inflight for u in healthy)
        bound = math.ceil((1.0 + cfg.balance_slack) * (total + 1) / len(healthy))
        share = math.ceil((1.0 + cfg.balance_slack) * (len(self._recent) + 1) / len(healthy))
        counts = self._recent_counts
        # Bounded load: an engine competes while its load with this request stays within
        # the bound, in flight and (when a window is set) among the recent requests. The
        # least loaded always passes the first; if no engine passes both, the first decides.
        within = [u for u in healthy if u.inflight + 1 <= bound]
        if cfg.balance_window:
            fair = [u for u in within if counts[u.url] + 1 <= share]
            within = fair or within
        prompt = max(1, len(tokens))
        best: list[tuple[Upstream, float]] = []
        best_cost = math.inf
        for upstream, h in zip(healthy, held, strict=True):
            if upstream not in within:
                continue
            cost = (1.0 - min(h, prompt) / prompt) + cfg.load_weight * upstream.inflight
            if cost < best_cost - 1e-9:
                best, best_cost = [(upstream, h)], cost
            elif cost <= best_cost + 1e-9:
                best.append((upstream, h))
        if not best:  # cannot happen (the least loaded is always within the bound)
            chosen = min(healthy, key=lambda u: u.inflight)
            reason = "load"
        elif previous is not None and any(u is previous for u, _ in best):
            chosen, reason = previous, "affinity"
        else:
            self._next += 1
            chosen = best[self._next % len(best)][0]
            top = max(held)
            reason = "cache" if top > 0 and dict(best)[chosen] >= top else "load"
        self._remember(conv, chosen)
        if cfg.balance_window:
            self._recent.append(chosen.url)
            counts[chosen.url] += 1
            if len(self._recent) > cfg.balance_window:
                counts[self._recent.popleft()] -= 1
        self._metrics.route_choices.labels(reason).inc()
        self._metrics.routed_prefix_tokens.inc(held[healthy.index(chosen)])
        self._metrics.routed_prompt_tokens.inc(len(tokens))
        return chosen

    async def _held(self, upstream: Upstream, tokens: list[int]) -> float:
        """Tokens of ``tokens``' prefix that ``upstream``'s node holds (SSD ones weighted);
        0 when its agent is unknown or does not answer within ``prefix_timeout_s``."""
        url = self._agents.get(upstream)
        if url is None:
            return 0.0
        timeout = aiohttp.ClientTimeout(total=self._config.prefix_timeout_s)
        try:
            async with self._session.post(
                url + "/v1/prefix", json={"token_ids": tokens}, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                data = await resp.json()
            tiers = data.get("tiers") or {}
            return float(tiers.get("cpu", 0)) + self._config.ssd_weight * float(tiers.get("ssd", 0))
        except (aiohttp.ClientError, TimeoutError, ValueError, TypeError) as exc:
            self._metrics.prefix_query_failures.inc()
            logger.debug("prefix query to %s failed: %s", url, exc)
            return 0.0

    async def _prompt_tokens(
        self, route: str, body: dict[str, Any], healthy: list[Upstream], auth: dict[str, str]
    ) -> list[int]:
        """The prompt's token ids: given in the body, else from an engine's ``/tokenize``
        (the same tokenizer and chat template the engine applies); [] when unknown."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]  # a batch: route by its first prompt
        if isinstance(prompt, list) and all(type(t) is int for t in prompt):
            return prompt
        query: dict[str, Any] = {"model": body.get("model")}
        messages = chat_messages(route, body)
        if isinstance(prompt, str):
            query["prompt"] = prompt
        elif messages is not None:
            query["messages"] = messages
        else:
            return []
        timeout = aiohttp.ClientTimeout(total=self._config.prefix_timeout_s * 4)
        upstream = healthy[self._next % len(healthy)]
        try:
            async with self._session.post(
                upstream.url + "/tokenize", json=query, timeout=timeout, headers=auth
            ) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                data = await resp.json()
            tokens = data.get("tokens")
            return tokens if isinstance(tokens, list) else []
        except (aiohttp.ClientError, TimeoutError, ValueError, TypeError) as exc:
            self._metrics.prefix_query_failures.inc()
            logger.debug("tokenize on %s failed: %s", upstream.url, exc)
            return []
