"""A load generator for OpenAI-compatible servers: concurrent, streaming, every token timed.

Two ways to offer load, as serving benchmarks do (vLLM's ``bench serve``, LMCache's
multi-round QA):

* **closed loop** (``concurrency=C``): C workers, each sends its next request the moment the
  previous one finished (no pause, so every asynchronous cost of the server, its saves
  included, is on the clock);
* **open loop** (``rate=R``): requests start at Poisson arrival times with mean rate R per
  second, whatever the server's speed (queueing shows as TTFT); an arrival goes to the next
  ready user and waits for one when none is.

A request is a ``RequestSpec`` (route, body, optional headers); a ``User`` is a sequence of
requests that must run one after the other (a chat's rounds, where round k+1's prompt
contains round k's answer; a single request is a one-request user). ``drive`` serves the
user whose previous answer came longest ago next (a FIFO of ready users), so users
interleave. Each request is streamed
(``stream: true``, with usage in the last chunk) and yields a ``RequestResult``: time to
first token, the gaps between tokens, end-to-end latency, token counts, and the server's
``cached_tokens`` when it reports them. A failed request is recorded with its error, never
raised: the benchmark counts failures.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request to send."""

    rid: str
    route: str
    """``/v1/completions`` or ``/v1/chat/completions``."""
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    tag: str = ""
    """Free label for grouping results (``cold``, ``warm``, a workload name)."""


@dataclass(slots=True)
class RequestResult:
    """What one request measured."""

    rid: str
    tag: str
    ok: bool
    error: str | None = None
    start_s: float = 0.0
    """Offset from the run's start at which the request was sent."""
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    """Gaps between consecutive streamed token chunks."""
    prompt_tokens: int | None = None
    output_tokens: int = 0
    cached_tokens: int | None = None
    text: str = ""
    token_ids: list[int] | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (None for one-token answers)."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


Follow = Callable[[RequestSpec, RequestResult], RequestSpec | None]
"""Given a request and its answer, the user's next request (None: the user is done). Lets a
chat put the model's real answer into the next prompt."""


async def send(
    session: aiohttp.ClientSession, base_url: str, spec: RequestSpec, started: float
) -> RequestResult:
    """Stream one request and time it."""
    body = dict(spec.body)
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    result = RequestResult(spec.rid, spec.tag, ok=False)
    t0 = time.perf_counter()
    result.start_s = t0 - started
    last = t0
    texts: list[str] = []
    try:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with session.post(
            base_url + spec.route, json=body, headers=spec.headers, timeout=timeout
        ) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                result.e2e_s = time.perf_counter() - t0
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:300]
                    break
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        result.cached_tokens = int(details["cached_tokens"])
                for choice in chunk.get("choices") or ():
                    piece = choice.get("text")
                    if piece is None:
                        piece = (choice.get("delta") or {}).get("content")
                    ids = choice.get("token_ids")
                    if ids:
                        result.token_ids = (result.token_ids or []) + list(ids)
                    if not piece and not ids:
                        continue
                    now = time.perf_counter()
                    if result.ttft_s is None:
                        result.ttft_s = now - t0
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    texts.append(piece or "")
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.e2e_s = time.perf_counter() - t0
    result.text = "".join(texts)
    if result.error is None:
        result.ok = result.ttft_s is not None
        if not result.ok:
            result.error = "no token streamed"
    return result


class User:
    """A sequence of requests that must run one after the other (a chat user, or one
    long-document question): ``take`` the next one; ``answered`` says whether another
    follows (``follow`` builds it from the answer, e.g. a chat's next round)."""

    def __init__(self, uid: str, first: RequestSpec, follow: Follow | None = None):
        self.uid = uid
        self._next: RequestSpec | None = first
        self._follow = follow

    def take(self) -> RequestSpec | None:
        spec, self._next = self._next, None
        return spec

    def answered(self, spec: RequestSpec, result: RequestResult) -> bool:
        """Record the answer; True when the user has another request to send."""
        if self._follow is not None and result.ok:
            self._next = self._follow(spec, result)
        return self._next is not None


async def drive(
    base_url: str,
    users: list[User],
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    seed: int = 0,
) -> tuple[list[RequestResult], float]:
    """Run every user's requests against ``base_url``: closed loop with ``concurrency``
    requests in flight, or open loop at Poisson ``rate`` requests/s. The next request sent
    is that of the user whose previous answer came longest ago (FIFO of ready users)."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency and rate")
    ready: asyncio.Queue[User | None] = asyncio.Queue()
    for user in users:
        ready.put_nowait(user)
    active = len(users)
    results: list[RequestResult] = []
    stoppers = concurrency or 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        started = time.perf_counter()

        async def serve_one(user: User) -> None:
            nonlocal active
            spec = user.take()
            assert spec is not None
            result = await send(http, base_url, spec, started)
            results.append(result)
            if user.answered(spec, result):
                ready.put_nowait(user)
                return
            active -= 1
            if active == 0:
                for _ in range(stoppers):
                    ready.put_nowait(None)

        if not users:
            return results, 0.0
        if concurrency is not None:

            async def worker() -> None:
                while (user := await ready.get()) is not None:
                    await serve_one(user)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            assert rate is not None
            rng = random.Random(seed)
            tasks: list[asyncio.Task[None]] = []
            next_at = time.perf_counter()
            while True:
                next_at += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                arrival = await ready.get()
                if arrival is None:
                    break
                tasks.append(asyncio.create_task(serve_one(arrival)))
            await asyncio.gather(*tasks)
        return results, time.perf_counter() - started


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by linear interpolation; None when empty."""
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


@dataclass(slots=True)
class Summary:
    """Aggregates of one arm's results."""

    completed: int
    failed: int
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    ttft_mean: float | None
    itl_p50: float | None
    itl_p99: float | None
    tpot_p50: float | None
    tpot_p99: float | None
    e2e_p50: float | None
    cached_tokens: int
    prompt_tokens: int
    errors: list[str]


def summarize(results: Sequence[RequestResult], seconds: float) -> Summary:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [g for r in ok for g in r.itl_s]
    tpot = [t for r in ok if (t := r.tpot_s) is not None]
    return Summary(
        completed=len(ok),
        failed=len(results) - len(ok),
        seconds=seconds,
        requests_per_s=len(ok) / seconds if seconds > 0 else 0.0,
        output_tokens_per_s=sum(r.output_tokens for r in ok) / seconds if seconds > 0 else 0.0,
        ttft_p50=percentile(ttft, 0.5),
        ttft_p90=percentile(ttft, 0.9),
        ttft_p99=percentile(ttft, 0.99),
        ttft_mean=statistics.fmean(ttft) if ttft else None,
        itl_p50=percentile(itl, 0.5),
        itl_p99=percentile(itl, 0.99),
        tpot_p50=percentile(tpot, 0.5),
        tpot_p99=percentile(tpot, 0.99),
        e2e_p50=percentile([r.e2e_s for r in ok], 0.5),
        cached_tokens=sum(r.cached_tokens or 0 for r in ok),
        prompt_tokens=sum(r.prompt_tokens or 0 for r in ok),
        errors=sorted({r.error or "" for r in results if not r.ok})[:5],
    )
