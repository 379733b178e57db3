"""``meshkv proxy`` on SIGTERM: the requests in flight get ``--drain-seconds`` to finish;
then each still running is answered, not dropped: a 503 the client can retry elsewhere,
or, where its stream has begun, an error event in that API's form (and ``[DONE]`` where the
API ends its streams with one), as vLLM ends a stream that fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web

from meshkv.proxy.answers import error_response, stream_error

logger = logging.getLogger(__name__)

DRAIN_GRACE_S = 2.0
"""How long past ``--drain-seconds`` the server waits for the answers of the requests
cut off at it to go out before closing."""


class Drain:
    """The client requests being answered (their tasks), which of them stream, and which
    were cut off at the drain deadline (any other cancellation: the client left)."""

    def __init__(self, drain_s: float) -> None:
        self.drain_s = drain_s
        self._handling: set[asyncio.Task[Any]] = set()
        self._streams: dict[asyncio.Task[Any], tuple[str, web.StreamResponse]] = {}
        self._cut: set[asyncio.Task[Any]] = set()

    def enter(self, task: asyncio.Task[Any]) -> None:
        self._handling.add(task)

    def leave(self, task: asyncio.Task[Any]) -> None:
        self._handling.discard(task)
        self._streams.pop(task, None)
        self._cut.discard(task)

    def streaming(self, route: str, response: web.StreamResponse) -> None:
        """The current request's answer is the stream ``response`` of ``route``, begun."""
        task = asyncio.current_task()
        if task is not None:
            self._streams[task] = (route, response)

    def was_cut(self, task: asyncio.Task[Any]) -> bool:
        return task in self._cut

    async def cut_at_deadline(self) -> None:
        """Run from the server's shutdown: after ``drain_s``, cancel every request still
        being answered (``answer`` then says why)."""
        await asyncio.sleep(self.drain_s)
        if self._handling:
            logger.warning("%d request(s) still in flight after --drain-seconds %g: cut off",
                           len(self._handling), self.drain_s)  # fmt: skip
        for task in list(self._handling):
            self._cut.add(task)
            task.cancel()

    async def answer(self, task: asyncio.Task[Any]) -> web.StreamResponse:
        """The answer of request ``task``, cut off at the drain deadline."""
        failure = error_response(
            503,
            f"meshkv proxy is shutting down: the request did not finish within "
            f"--drain-seconds ({self.drain_s:g} s); retry it",
            "unavailable",
        )
        if task not in self._streams:
            return failure
        route, stream = self._streams[task]
        with contextlib.suppress(ConnectionError, RuntimeError):
            await stream.write(stream_error(route, failure, done=True))
            await stream.write_eof()
        return stream
