"""Build a tiny random Llama model + byte-level BPE tokenizer offline, for tests and benchmarks.

vLLM loads the result from a directory like any Hugging Face checkpoint. Nothing is
downloaded: the tokenizer is trained on a built-in text and the weights are drawn from a
seeded normal distribution (std 0.2 by default, so greedy decoding is not all ties).
Builds are cached under ``<cache_dir>/tiny-llama-<config hash>`` and reused.

    python -m benchmarks.tiny_llama --out-dir /tmp/models [--layers 8 --hidden 512 ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meshkv.errors import ConfigError

logger = logging.getLogger(__name__)

# Head sizes vLLM's CPU attention backend accepts (FACTS.md).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
_BUILDER_VERSION = 1

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Peer to peer caches share key value "
    "tensors between inference engines. Every node runs one agent; engines talk to it "
    "through shared memory. Chunks are hashed by their prefix, so the same tokens map to "
    "the same key on every machine. Disks keep chunks across restarts. Lorem ipsum dolor "
    "sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua. 0123456789 !?,.;:-_()[]{}'\" \n"
)


@dataclass(frozen=True, slots=True)
class TinyLlamaConfig:
    """Shape of the random model."""

    num_layers: int = 2
    """Decoder layers."""
    hidden_size: int = 128
    """Model width."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention when fewer than ``num_heads``)."""
    head_dim: int = 32
    """Elements per head; must be one of ``CPU_HEAD_SIZES``."""
    intermediate_size: int = 256
    """MLP width."""
    vocab_size: int = 1024
    """Tokenizer vocabulary (byte-level BPE trained to this size)."""
    max_position_embeddings: int = 8192
    """Longest context the model accepts."""
    init_std: float = 0.2
    """Standard deviation of the random weights."""
    seed: int = 0
    """Seed of the weight RNG."""
    dtype: str = "float16"
    """Saved weight dtype (``float16``, ``bfloat16`` or ``float32``)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"tiny llama: {name} must be positive")
        if self.head_dim not in CPU_HEAD_SIZES:
            raise ConfigError(
                f"tiny llama: head_dim {self.head_dim} is not one of vLLM CPU's {CPU_HEAD_SIZES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("tiny llama: num_heads must be a multiple of num_kv_heads")
        if self.vocab_size < 300:
            raise ConfigError("tiny llama: vocab_size must be at least 300 (bytes + specials)")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"tiny llama: unsupported dtype {self.dtype!r}")

    def digest(self) -> str:
        """Short hash naming the cache directory."""
        raw = json.dumps({"v": _BUILDER_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:12]


BENCH_CONFIG = TinyLlamaConfig(
    num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1024
)
"""The benchmark model: 8 KiB of fp16 KV per token, 2 MiB per 256-token chunk."""


def default_cache_dir() -> Path:
    """``$MESHKV_CACHE/models`` or ``~/.cache/meshkv/models``."""
    base = os.environ.get("MESHKV_CACHE") or os.path.join(Path.home(), ".cache", "meshkv")
    return Path(base) / "models"


def build_tiny_llama(
    config: TinyLlamaConfig | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Return the directory of the model described by ``config``, building it if needed."""
    config = config or TinyLlamaConfig()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"tiny-llama-{config.digest()}"
    if (target / "meshkv-tiny.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=root))
    try:
        _write_model(config, staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same build first; its copy is identical.
            if not (target / "meshkv-tiny.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built tiny llama %s at %s", config.digest(), target)
    return target


def _write_model(config: TinyLlamaConfig, out: Path) -> None:
    import tokenizers
    import torch
    import transformers

    # Both libraries are untyped; treat them as such in one place.
    tk: Any = tokenizers
    tf: Any = transformers
    Tokenizer, decoders, models = tk.Tokenizer, tk.decoders, tk.models
    pre_tokenizers, trainers = tk.pre_tokenizers, tk.trainers
    LlamaConfig, LlamaForCausalLM = tf.LlamaConfig, tf.LlamaForCausalLM
    PreTrainedTokenizerFast = tf.PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(out)
    vocab = config.vocab_size  # the embedding may be larger than the trained vocabulary

    hf_config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(hf_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.init_std)
    model = model.to(getattr(torch, config.dtype))
    model.save_pretrained(out, safe_serialization=True)
    (out / "meshkv-tiny.json").write_text(json.dumps(asdict(config), indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="cache directory (default: $MESHKV_CACHE)")
    parser.add_argument("--bench", action="store_true", help="the 8-layer benchmark model")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--head-dim", type=int)
    args = parser.parse_args(argv)
    base = BENCH_CONFIG if args.bench else TinyLlamaConfig()
    overrides = {
        "num_layers": args.layers,
        "hidden_size": args.hidden,
        "num_heads": args.heads,
        "num_kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
    }
    fields = asdict(base)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    print(build_tiny_llama(TinyLlamaConfig(**fields), args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
