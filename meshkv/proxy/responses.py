"""The Responses API's stored responses behind ``meshkv proxy``. vLLM keeps a response it
stores (``store``, with its response store on) in the memory of the engine that answered,
so a follow-up that names it (``previous_response_id``), ``GET /v1/responses/{id}`` and
``POST /v1/responses/{id}/cancel`` work only on that engine: the proxy remembers which
engine answered each response id it relayed, and sends those there; an id it did not relay
(another replica did, or it restarted since) is looked for on the engines."""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from typing import Any

import aiohttp

RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,200})"')
VALID_ID = re.compile(r"resp_[A-Za-z0-9_-]{1,200}")
"""What a client may name as a response id (it goes into an engine URL when asked for)."""
"""A response's id in an answer or the first events of a stream (vLLM: ``resp_<hex>``)."""
SCAN_BYTES = 64 << 10
"""How much of a streamed answer is searched for its response id."""
MAX_RESPONSES = 65536
"""Response ids remembered (least recently used dropped first)."""


class ResponseHolders:
    """Which engine (base URL) answered each response id."""

    def __init__(self) -> None:
        self._by_id: OrderedDict[str, str] = OrderedDict()

    def learn(self, url: str, answer: bytes) -> bool:
        """Remember the response id in ``answer`` (the first one: a response's own id
        comes before its output items') as answered by ``url``; whether one was found."""
        found = RESPONSE_ID.search(answer[:SCAN_BYTES])
        if found is None:
            return False
        self.remember(found.group(1).decode(), url)
        return True

    def remember(self, response_id: str, url: str) -> None:
        self._by_id[response_id] = url
        self._by_id.move_to_end(response_id)
        while len(self._by_id) > MAX_RESPONSES:
            self._by_id.popitem(last=False)

    def holder(self, response_id: Any) -> str | None:
        """The engine that answered ``response_id``, if the proxy relayed that answer."""
        if not isinstance(response_id, str):
            return None
        url = self._by_id.get(response_id)
        if url is not None:
            self._by_id.move_to_end(response_id)
        return url


class StreamScan:
    """Finds the response id in the first ``SCAN_BYTES`` of a streamed answer."""

    def __init__(self, holders: ResponseHolders, url: str) -> None:
        self._holders = holders
        self._url = url
        self._head = b""
        self.done = False

    def feed(self, piece: bytes) -> None:
        self._head += piece
        if self._holders.learn(self._url, self._head) or len(self._head) >= SCAN_BYTES:
            self.done = True
            self._head = b""


async def find_holder(
    session: aiohttp.ClientSession,
    urls: list[str],
    response_id: str,
    timeout_s: float,
    headers: dict[str, str],
) -> str | None:
    """The first of the engines at ``urls`` that answers ``GET /v1/responses/{id}`` with
    200 (all asked at once), or None."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def holds(url: str) -> bool:
        try:
            async with session.get(
                f"{url}/v1/responses/{response_id}", timeout=timeout, headers=headers
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    answers = await asyncio.gather(*(holds(url) for url in urls))
    return next((url for url, yes in zip(urls, answers, strict=True) if yes), None)
