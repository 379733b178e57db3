"""What ``meshkv proxy`` answers and sends: OpenAI-style errors, the exceptions that carry
an answer out of a request's handling, the relay of a streamed piece, concurrent upstream
calls that fail as one, and the prefill leg of a disaggregated request."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")

PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
"""vLLM's standard prefill-leg parameters (as its toy proxy and llm-d's sidecar send them)."""


def stream_error(route: str, failure: web.Response, done: bool = False) -> bytes:
    """The event that ends a stream already begun on ``route`` with ``failure`` (an
    ``error_response``), in that API's own form: Anthropic's ``event: error`` for
    ``/v1/messages`` (as vLLM sends it), else OpenAI's ``data: {"error": ...}``, then
    ``data: [DONE]`` when ``done`` on the routes whose streams end with one (completions
    and chat; Messages and Responses streams have none)."""
    assert isinstance(failure.body, bytes)
    if route == "/v1/messages":
        try:
            message = str(json.loads(failure.body)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = failure.body.decode(errors="replace")
        kind = "overloaded_error" if failure.status == 503 else "api_error"
        event = {"type": "error", "error": {"type": kind, "message": message}}
        return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
    out = b"data: " + failure.body + b"\n\n"
    if done and route in ("/v1/completions", "/v1/chat/completions"):
        out += b"data: [DONE]\n\n"
    return out


class ClientGone(Exception):
    """The client closed its connection while its answer was being streamed."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client closed the connection")
        self.response = response


class UpstreamFailed(Exception):
    """An upstream request failed; carries the answer to give the client."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.text)
        self.response = response


def error_response(status: int, message: str, kind: str) -> web.Response:
    """An OpenAI-style error body."""
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status)


async def to_client(response: web.StreamResponse, piece: bytes | None) -> None:
    """Relay a piece of a streamed answer (None: the end) to the client. A client that hung
    up is not the upstream's failure: ``ClientGone``, and leaving the upstream call closes
    its connection, which aborts the request there."""
    try:
        if piece is None:
            await response.write_eof()
        else:
            await response.write(piece)
    except ConnectionError as exc:  # aiohttp's ClientConnectionResetError is one
        raise ClientGone(response) from exc


async def all_or_first_failure(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Run ``calls`` concurrently and return their results in order; the first that fails
    cancels the others, and an ``UpstreamFailed`` among them is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_awaited(call)) for call in calls]
    except ExceptionGroup as failed:
        first = failed.exceptions[0]
        if isinstance(first, UpstreamFailed):
            raise first from None
        raise
    return [task.result() for task in tasks]


async def _awaited(call: Awaitable[T]) -> T:
    return await call


def prefill_body(route: str, body: dict[str, Any], push_to: str | None) -> dict[str, Any]:
    """The prefill leg of a request: one token, not streamed, vLLM's P/D parameters (each
    API's own field for the token limit; a Responses request is not stored)."""
    leg = copy.deepcopy(body)
    if route == "/v1/responses":
        leg["max_output_tokens"] = 1
        leg["store"] = False
    else:
        leg["max_tokens"] = 1
    if "max_completion_tokens" in leg:
        leg["max_completion_tokens"] = 1
    if "min_tokens" in leg:
        leg["min_tokens"] = min(1, leg["min_tokens"] or 0)
    leg["stream"] = False
    leg.pop("stream_options", None)
    if route in ("/v1/completions", "/v1/chat/completions"):
        leg["n"] = 1
    params: dict[str, Any] = dict(PREFILL_PARAMS)
    if push_to is not None:
        params["meshkv_push_to"] = push_to
    leg["kv_transfer_params"] = params
    return leg
