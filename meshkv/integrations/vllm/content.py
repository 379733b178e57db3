"""What a chunk's token ids do not say about its KV: the multimodal inputs and prompt
embeddings that go into its key (the scheduler side's ``_keys_for``)."""

from __future__ import annotations

from typing import Any

import xxhash


def content_extras(request: Any, bounds: list[tuple[int, int]]) -> dict[int, bytes]:
    """What the token ids of each chunk (``bounds[i]``: its token range) do not say about
    its KV, as vLLM's own block hashes add it: the multimodal inputs whose placeholder
    tokens overlap the chunk (their content hash and where they start relative to it), and
    the hash of the chunk's prompt embeddings. Two prompts whose images differ but whose
    placeholder tokens are the same must never share KV; keys chain, so every chunk after
    an image depends on it too. Text chunks get nothing (their keys stay as they were)."""
    features = getattr(request, "mm_features", None) or ()
    embeds = getattr(request, "prompt_embeds", None)
    if not features and embeds is None:
        return {}
    out: dict[int, bytes] = {}
    for i, (start, end) in enumerate(bounds):
        parts = []
        for feature in features:
            offset, length = feature.mm_position.offset, feature.mm_position.length
            if offset < end and start < offset + length:
                parts.append(f"mm:{feature.identifier}@{offset - start}".encode())
        if embeds is not None:
            block = embeds[start:end]
            if len(block):
                import torch

                raw = block.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                parts.append(b"embeds:" + xxhash.xxh3_128_digest(memoryview(raw)))
        if parts:
            out[i] = b"|" + b"|".join(parts)
    return out
