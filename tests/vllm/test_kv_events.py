"""vLLM KV events: with ``--kv-events-config`` a real OpenAI server publishes, beside its
own block events, a ``BlockStored`` for every chunk the meshkv connector saved (medium
``CPU``, ownership ``meshkv``), the move of those a later lookup finds on SSD (medium
``STORAGE``), and a ``BlockRemoved`` for those a later lookup finds gone,
decoded here with vLLM's own event classes off a real ZMQ subscription."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

from meshkv.launch import AgentProcess, HttpProcess, http_post_json
from tests.vllm.engines import Prompts

pytestmark = pytest.mark.vllm


def _collect(
    sub: zmq.Socket[bytes], until: Callable[[list[Any]], bool], timeout: float = 30.0
) -> list[Any]:
    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    events: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sub.poll(200):
            if until(events):
                break
            continue
        topic, _seq, payload = sub.recv_multipart()
        assert topic == b"kv"
        events.extend(decoder.decode(payload).events)
    return events


def test_saved_chunks_are_published_as_vllm_kv_events(
    openai_server: Callable[..., HttpProcess],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    tmp_path: Path,
) -> None:
    token = os.urandom(16).hex()
    token_file = tmp_path / "admin-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    agent = agents(args=["--admin-token-file", str(token_file)]).start()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    endpoint = f"ipc://{tmp_path}/kv-events"  # vLLM's publisher binds ipc:// (and tcp://*)
    sub.connect(endpoint)
    try:
        config = {
            "enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
            "endpoint": endpoint,
        }  # fmt: skip
        server = openai_server(
            agent, prefix_caching=True, args=["--kv-events-config", json.dumps(config)]
        )
        prompt = prompts.a  # 700 tokens: two 256-token chunks and 188 more
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}
        http_post_json(server.base_url + "/v1/completions", body, timeout=120)

        def ours(events: list[Any], kind: type = BlockStored) -> list[Any]:
            return [e for e in events if isinstance(e, kind) and e.ownership == "meshkv"]

        events = _collect(sub, lambda events: len(ours(events)) >= 2)
        with agent.client() as client:
            # The agent holds them, and the cut of the third chunk (block_hits), which is
            # not published: vLLM publishes the blocks it keeps itself.
            assert client.stats()["tiers"]["cpu"]["chunks"] == 3
        # The agent restarts: its chunks are on SSD now (written at the stop). The next
        # lookup finds them there, and the router hears that they moved.
        agent.restart()

        def on_storage(events: list[Any]) -> list[Any]:
            return [e for e in ours(events) if e.medium == "STORAGE"]

        moved: list[Any] = []
        for _ in range(5):  # the engine's first call after the restart may still fail
            http_post_json(server.base_url + "/v1/completions", body, timeout=120)
            seen = list(moved)
            moved += _collect(sub, lambda ev, seen=seen: len(on_storage(seen + ev)) >= 2, 10)
            if len(on_storage(moved)) >= 2:
                break
        # The agent loses them (an admin clear): the next request for the prompt finds
        # them gone, and the router hears it.
        clear = urllib.request.Request(
            agent.url + "/v1/clear", method="POST", data=b"",
            headers={"Authorization": f"Bearer {token}"},
        )  # fmt: skip
        with urllib.request.urlopen(clear, timeout=5) as response:
            assert response.status == 200
        http_post_json(server.base_url + "/v1/completions", body, timeout=120)
        later = _collect(sub, lambda events: len(ours(events, BlockRemoved)) >= 2)
    finally:
        sub.close(linger=0)
        ctx.term()
    stored = [e for e in events if isinstance(e, BlockStored)]
    mine = ours(stored)
    engine = [e for e in stored if e.ownership != "meshkv"]
    assert len(mine) == 2, events
    first, second = mine
    block = first.block_size
    # Each event covers one chunk's vLLM blocks, with the engine's own hashes and tokens.
    assert first.medium == second.medium == "CPU"
    assert len(first.block_hashes) == len(second.block_hashes) == 256 // block
    assert first.token_ids == prompt[:256] and second.token_ids == prompt[256:512]
    assert first.parent_block_hash is None
    assert second.parent_block_hash == first.block_hashes[-1]
    engine_hashes = [h for e in engine for h in e.block_hashes]
    assert engine_hashes[: 512 // block] == first.block_hashes + second.block_hashes
    # The move to SSD: removed from CPU, stored in STORAGE, the very same blocks.
    hashes = [first.block_hashes, second.block_hashes]
    assert [e.block_hashes for e in ours(moved, BlockRemoved)] == hashes
    assert all(e.medium == "CPU" for e in ours(moved, BlockRemoved))
    assert [e.block_hashes for e in on_storage(moved)] == hashes
    # The removals name exactly the blocks of the two chunks, in the medium last published.
    removed = ours(later, BlockRemoved)
    assert [e.block_hashes for e in removed] == hashes
    assert all(e.medium in ("CPU", "STORAGE") for e in removed)
