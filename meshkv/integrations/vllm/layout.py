"""What an engine's KV bytes look like: the chunk namespace and the block geometry.

Both connector roles derive the same ``EngineLayout`` from vLLM's config, so the keys the
scheduler computes match the bytes the worker stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from meshkv.chunk import Namespace
from meshkv.errors import ConfigError

from .config import ConnectorConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


@dataclass(frozen=True, slots=True)
class EngineLayout:
    """Geometry of one engine's KV cache (per TP rank)."""

    model: str
    dtype: str
    layer_names: tuple[str, ...]
    """Attention layers in model order: the layer-major order of a chunk payload."""
    num_kv_heads: int
    head_size: int
    block_size: int
    packing: str
    """Backend and block packing, e.g. ``vllm-cpu-vec``."""
    tp_size: int
    cache_salt: str
    page: str = ""
    """How vLLM stores one block of one layer (``HNC``/``NHC``/``NC``, see
    ``meshkv.kernels.LayoutKind.PAGED``), from the resolved ``KVCacheLayout``; empty when
    vLLM does not say (then the worker reads it off the tensors alone)."""
    mla: bool = False
    """An MLA latent cache: one head, ``head_size`` latent elements per token."""
    revision: str = ""
    """The model's revision (commit or tag) when the engine names one: two revisions of
    one model name are different weights, hence different KV."""
    quantization: str = ""
    """The weights' quantization method (``awq``, ``fp8``, ...; empty: none): quantized
    weights compute different KV than the full-precision model of the same name."""
    drafter: str = ""
    """The speculative-decoding drafter whose attention layers share the engine's blocks
    (``<method>:<draft model>[@revision]``; empty: none, or one that keeps no KV such as
    n-gram): its layers are part of every chunk, and two drafters compute different KV."""

    def _extra(self) -> dict[str, str]:
        extra = {"quantization": self.quantization} if self.quantization else {}
        if self.drafter:
            extra["drafter"] = self.drafter
        return extra

    def namespace(self, tp_rank: int) -> Namespace:
        return Namespace(
            model=self.model,
            revision=self.revision,
            extra=self._extra(),
            dtype=self.dtype,
            num_layers=len(self.layer_names),
            kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            block_size=self.block_size,
            layout=self.packing,
            tp_rank=tp_rank,
            tp_size=self.tp_size,
            cache_salt=self.cache_salt,
        )


_SPLIT_KV = {
    "pipeline_parallel_size": "pipeline parallelism: each stage holds the KV of its own layers",
    "decode_context_parallel_size": (
        "decode context parallelism: each rank holds every n-th token of a block"
    ),
    "prefill_context_parallel_size": (
        "prefill context parallelism: each rank holds a part of the prompt's tokens"
    ),
}


def check_parallelism(parallel_config: Any) -> None:
    """Refuse the parallel layouts whose KV the chunk keys cannot tell apart. Keys name the
    tensor-parallel rank only, so two pipeline stages (or context-parallel ranks) of one
    engine would store different bytes under the same key and load each other's: wrong
    output, not an error. Data parallelism is fine (each replica is an engine of its own)."""
    for attr, why in _SPLIT_KV.items():
        size = getattr(parallel_config, attr, 1)
        if isinstance(size, int) and size > 1:
            raise ConfigError(
                f"meshkv connector: {attr}={size} is not supported ({why}, and meshkv's "
                "chunk keys name only the tensor-parallel rank); run with "
                f"{attr}=1 (tensor parallelism is supported) or without the connector"
            )


_SUPPORTED_SPECS = ("FullAttentionSpec", "MLAAttentionSpec")
"""KV cache specs whose blocks hold every token's KV, in place, for as long as the request
runs (a ``FullAttentionSpec`` that records a sliding window too: vLLM then allocates
blocks for all tokens). Checked by exact class name: a subclass may change that."""
_WHY_NOT = {
    "SlidingWindowSpec": "vLLM frees the blocks that leave the window, so a chunk would be "
    "saved from, or loaded into, blocks that no longer hold its tokens",
    "SlidingWindowMLASpec": "vLLM frees the blocks that leave the window",
    "ChunkedLocalAttentionSpec": "vLLM frees the blocks of earlier attention chunks",
    "CircularBufferSpec": "its blocks are a ring reused in place",
    "RSWASpec": "vLLM evicts blocks between the prompt and the decode window",
    "SinkFullAttentionSpec": "its attention-sink slots are not a token's KV",
    "MambaSpec": "a state, not per-token KV",
}


def check_spec(spec: Any) -> None:
    """Refuse the KV cache specs whose bytes are not a prompt's per-token KV that stays put
    (and the non-causal layers whose KV of a token depends on later tokens)."""
    kind = type(spec).__name__
    if kind not in _SUPPORTED_SPECS:
        why = _WHY_NOT.get(kind, "meshkv moves full-attention and MLA KV only")
        raise ConfigError(
            f"meshkv connector: KV cache spec {kind} is not supported ({why}); "
            "run this model without the connector"
        )
    for attr in ("num_kv_heads", "head_size", "block_size", "dtype"):
        if not hasattr(spec, attr):
            raise ConfigError(
                f"meshkv connector: KV cache spec {kind} has no {attr} (a vLLM this "
                "connector does not know)"
            )
    if getattr(spec, "non_causal", False):
        raise ConfigError(
            "meshkv connector: non-causal attention layers (a prefix LM) are not supported: "
            "a token's KV depends on the tokens after it, which a chunk's key does not name"
        )


def engine_layout(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None, cfg: ConnectorConfig
) -> EngineLayout:
    """Derive the layout from vLLM's configs; raise ``ConfigError`` for unsupported ones."""
    if kv_cache_config is None:
        raise ConfigError("meshkv connector: vLLM passed no kv_cache_config (needs vLLM >= 0.32)")
    check_parallelism(vllm_config.parallel_config)
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError(
            f"meshkv connector: models with {len(groups)} KV cache groups (hybrid or "
            "sliding-window attention) are not supported yet; only one full-attention group"
        )
    spec: Any = groups[0].kv_cache_spec
    check_spec(spec)
    model_config = vllm_config.model_config
    dtype = str(spec.dtype).removeprefix("torch.")
    cfg.check_block_size(int(spec.block_size))
    salt = cfg.namespace_salt
    return EngineLayout(
        model=cfg.model_id or str(model_config.model),
        dtype=dtype,
        layer_names=tuple(groups[0].layer_names),
        num_kv_heads=int(spec.num_kv_heads),
        head_size=int(spec.head_size),
        block_size=int(spec.block_size),
        packing=_packing(vllm_config, spec),
        tp_size=int(vllm_config.parallel_config.tensor_parallel_size),
        cache_salt=salt,
        page=resolved_page(vllm_config),
        mla=type(spec).__name__.startswith("MLA"),
        revision=str(getattr(model_config, "revision", None) or ""),
        quantization=str(getattr(model_config, "quantization", None) or ""),
        drafter=drafter_identity(vllm_config, cfg),
    )


def eagle_block_drop(vllm_config: Any) -> bool:
    """Whether vLLM drops a prefix-cache hit's last block for the engine's EAGLE-style
    drafter (``SpeculativeConfig.use_eagle_block_drop``); the connector's hits do the same."""
    spec = getattr(vllm_config, "speculative_config", None)
    drop = getattr(spec, "use_eagle_block_drop", None)
    return bool(callable(drop) and drop())


def drafter_identity(vllm_config: Any, cfg: ConnectorConfig) -> str:
    """``<method>:<draft model>[@revision]`` when a speculative-decoding drafter keeps KV in
    the engine's blocks (vLLM puts its attention layers in the same KV cache group as the
    target's, so they are in every chunk); "" for none, or for one without KV (n-gram,
    suffix, Medusa). Engines with different drafters then never share chunks: the target
    layers' bytes would agree, the drafter's would not (fewer draft tokens accepted)."""
    spec = getattr(vllm_config, "speculative_config", None)
    uses_kv = getattr(spec, "uses_draft_kv_cache", None)
    if spec is None or not callable(uses_kv) or not uses_kv():
        return ""
    draft = getattr(spec, "draft_model_config", None)
    name = cfg.draft_model_id or str(getattr(draft, "model", "") or "")
    revision = str(getattr(draft, "revision", None) or "")
    return f"{spec.method}:{name}" + (f"@{revision}" if revision else "")


#: Page order of each of vLLM's ``KVCacheLayout`` orders (``L`` and ``B`` only place
#: whole pages; what counts for the bytes is how heads, tokens and content sit in a page).
PAGE_OF_LAYOUT = {
    "LBHNC": "HNC",
    "BLHNC": "HNC",
    "LBNHC": "NHC",
    "BLNHC": "NHC",
    "LHBNC": "NC",
    "BHLNC": "NC",
}


def resolved_page(vllm_config: VllmConfig) -> str:
    """The page order of the engine's resolved KV cache layout ("" when vLLM has none)."""
    cache_config: Any = vllm_config.cache_config
    try:
        name = cache_config.get_resolved_kv_cache_layout().name
    except (AttributeError, RuntimeError, ValueError):
        return ""
    return PAGE_OF_LAYOUT.get(str(name), "")


def _packing(vllm_config: VllmConfig, spec: Any) -> str:
    """Name of the block packing. On CPU it depends on the instruction set (FACTS.md)."""
    from vllm.platforms import current_platform

    device = str(current_platform.device_type)
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if device == "cpu":
        from vllm.v1.attention.backends import cpu_attn

        isa = cpu_attn._get_attn_isa(
            vllm_config.model_config.dtype
            if isinstance(vllm_config.model_config.dtype, torch.dtype)
            else spec.dtype,
            int(spec.block_size),
            int(spec.head_size),
            cache_dtype,
        )
        return f"vllm-cpu-{isa}-{cache_dtype}"
    backend = (
        getattr(vllm_config.attention_config, "backend", None)
        if hasattr(vllm_config, "attention_config")
        else None
    )
    page = resolved_page(vllm_config)
    return f"vllm-{device}-{backend or 'default'}-{cache_dtype}-{page or 'unknown'}"
