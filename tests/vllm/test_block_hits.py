"""``block_hits`` in a real vLLM engine: a prompt that starts with another prompt hits every
full engine block of it, not only its whole chunks, and generates what an engine with no
cache generates."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshkv.launch import AgentProcess
from tests.vllm.engines import EngineRun, Prompts

pytestmark = pytest.mark.vllm


def test_a_longer_prompt_hits_the_blocks_of_the_shorter_ones_last_chunk(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    agent = agents().start()
    result = engine(
        [prompts.a, prompts.e, prompts.a], connector={"socket_path": agent.socket_path}
    ).result()
    cold, question, again = result["outputs"]
    assert cold["cached_tokens"] == 0
    # A (700 tokens) saved two 256-token chunks and its third cut to one 128-token block;
    # E = A + 40 tokens: its third chunk is not whole, the cut of it is A's.
    assert question["cached_tokens"] == 512 + 128
    assert again["cached_tokens"] == 512 + 128  # 60 tokens computed, not 188
    assert cold["tokens"] == baseline["a"]
    assert question["tokens"] == baseline["e"]
    assert again["tokens"] == baseline["a"]
    counters = result["counters"]
    assert counters["hit_tokens"] == 2 * 640
    assert counters["loaded_chunks"] == 6 and counters["load_errors"] == 0
    # A's two chunks and its cut; E's own cut is A's (loaded, so not saved again) and its
    # 228 tokens after the second chunk make no second block.
    assert counters["saved_chunks"] == 3
    with agent.client() as client:
        stats = client.stats()
    assert stats["tiers"]["cpu"]["chunks"] == 3


def test_without_block_hits_only_whole_chunks_hit(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
) -> None:
    agent = agents().start()
    result = engine(
        [prompts.a, prompts.e],
        connector={"socket_path": agent.socket_path, "block_hits": False},
    ).result()
    cold, question = result["outputs"]
    assert (cold["cached_tokens"], question["cached_tokens"]) == (0, 512)
    assert question["tokens"] == baseline["e"]
    assert result["counters"]["saved_chunks"] == 2
