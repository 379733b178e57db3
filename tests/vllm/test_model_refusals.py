"""Models whose KV the connector cannot move correctly are refused when the engine starts,
with the reason, never served wrong: here a sliding-window model (the tiny Llama as a
Mistral with a 256-token window, so vLLM gives it a ``SlidingWindowSpec`` and frees the
blocks that leave the window). Pipeline parallelism: ``test_tensor_parallel.py``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from meshkv.launch import AgentProcess
from tests.vllm.engines import EngineRun, Prompts, assert_refused_at_start

pytestmark = pytest.mark.vllm


def test_a_sliding_window_model_is_refused_at_start_up(
    engine: Callable[..., EngineRun],
    agents: Callable[..., AgentProcess],
    prompts: Prompts,
    tiny_model: str,
    tmp_path: Path,
) -> None:
    model = tmp_path / "tiny-mistral-window"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=256)
    (model / "config.json").write_text(json.dumps(config))
    agent = agents().start()
    run = engine([prompts.a], connector={"socket": agent.socket_path}, model=str(model))
    assert_refused_at_start(
        run, agent, "meshkv connector: KV cache spec SlidingWindowSpec is not supported"
    )
