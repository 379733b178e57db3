"""A batch of prompts through ``meshkv proxy``'s P/D mode, answered as vLLM answers one:
which requests are batches, and the answers or streams of their prompts joined."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp


async def pump_events(
    i: int,
    resp: aiohttp.ClientResponse,
    events: asyncio.Queue[tuple[int, bytes | BaseException | None]],
) -> None:
    """Split upstream ``i``'s SSE stream into events (``data: ...``, without the blank
    line) onto ``events``; then None, or the exception that ended it."""
    buffer = b""
    try:
        async for piece in resp.content.iter_any():
            buffer += piece
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                await events.put((i, event))
        if buffer.strip():
            await events.put((i, buffer))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        await events.put((i, exc))
        return
    await events.put((i, None))


class StreamJoin:
    """The events of a batch's streams joined into one stream, as vLLM streams a batch."""

    def __init__(self, per_prompt: int) -> None:
        self.per_prompt = per_prompt
        self.id: Any = None
        self.usages: list[dict[str, Any]] = []
        self.first_content = True

    def event(self, i: int, event: bytes) -> bytes | None:
        """The event of stream ``i`` to send on (None: held back or dropped)."""
        if not event.startswith(b"data:"):
            return event + b"\n\n"
        payload = event[5:].strip()
        if payload == b"[DONE]":
            return None  # one at the end, for all
        try:
            data = json.loads(payload)
        except ValueError:
            return event + b"\n\n"
        if not isinstance(data, dict):
            return event + b"\n\n"
        choices = data.get("choices")
        if not choices and isinstance(data.get("usage"), dict):
            self.usages.append(data)  # the final usage event: one, summed, at the end
            return None
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and type(choice.get("index")) is int:
                    choice["index"] += i * self.per_prompt
        if "id" in data:
            if self.id is None:
                self.id = data["id"]
            data["id"] = self.id
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    def close(self) -> list[bytes]:
        """The last events: the summed usage (when the streams sent theirs), ``[DONE]``."""
        out = []
        if self.usages:
            last = dict(self.usages[-1])
            last["usage"] = join_completions(self.usages)["usage"]
            if self.id is not None:
                last["id"] = self.id
            out.append(b"data: " + json.dumps(last).encode() + b"\n\n")
        out.append(b"data: [DONE]\n\n")
        return out


def batch_prompts(route: str, body: dict[str, Any]) -> list[Any] | None:
    """The prompts of a completions request that names more than one (texts or token
    lists), else None (a single text, or one list of token ids)."""
    prompt = body.get("prompt")
    if route != "/v1/completions" or not isinstance(prompt, list) or len(prompt) < 2:
        return None
    if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
        return prompt
    return None


def join_completions(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """One completions answer from the answers of a batch's prompts, as vLLM builds a
    batch's: the first's id and fields, every choice in prompt order with its index
    renumbered, usage summed (cached-token details: the last prompt's, as vLLM's)."""
    out = dict(answers[0])
    choices: list[Any] = []
    for answer in answers:
        for choice in answer.get("choices") or []:
            if isinstance(choice, dict):
                choice = {**choice, "index": len(choices)}
            choices.append(choice)
    out["choices"] = choices
    usages = [a["usage"] for a in answers if isinstance(a.get("usage"), dict)]
    if len(usages) == len(answers):
        usage: dict[str, Any] = dict(usages[-1])
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            values = [u.get(name) for u in usages]
            if all(type(v) is int for v in values):
                usage[name] = sum(v for v in values if isinstance(v, int))
        out["usage"] = usage
    return out
