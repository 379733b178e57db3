"""Optional int8 KV quantization of chunk payloads: half the bytes of fp16, a bounded error.

A quantized chunk is one packed byte buffer: the int8 values of the payload in payload
order, then one float32 scale per *group*, a group being one plane of one block of one
layer (``piece_elems`` values). Within a group ``q = round(x / s)`` with
``s = max|x| / 127``, so every value comes back within ``s / 2`` of the original, plus the
rounding of the cast back to the cache dtype. The grouping follows the payload, not the
engine's packing, so it works for any layout, opaque ones included.

These helpers are not on the lossless path: a namespace that stores quantized chunks must
say so (the bytes differ), and the engine must accept the error.
"""

from __future__ import annotations

import torch

from .layouts import KVLayout

#: Cache dtypes that can be quantized (fp8 and integer caches are already narrow).
QUANTIZABLE = frozenset({torch.float16, torch.bfloat16, torch.float32})
QMAX = 127


def _groups(layout: KVLayout, num_blocks: int) -> int:
    return layout.num_layers * num_blocks * layout.planes


def quantized_nbytes(layout: KVLayout, num_blocks: int) -> int:
    """Bytes of a quantized chunk of ``num_blocks`` blocks: int8 values + fp32 scales."""
    values = _groups(layout, num_blocks) * layout.piece_elems
    return values + 4 * _groups(layout, num_blocks)


def _check(layout: KVLayout, buf: torch.Tensor, nbytes: int, what: str) -> torch.Tensor:
    if layout.dtype not in QUANTIZABLE:
        raise TypeError(f"cannot quantize a {layout.dtype} cache (need fp16, bf16 or fp32)")
    if not isinstance(buf, torch.Tensor) or buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(f"{what} must be a contiguous 1-D tensor")
    if buf.dtype not in (torch.uint8, layout.dtype) or buf.nbytes != nbytes:
        raise ValueError(
            f"{what} must be uint8 or {layout.dtype} and hold {nbytes} bytes, "
            f"got {buf.dtype} holding {buf.nbytes}"
        )
    return buf.view(torch.uint8)


def quantize_int8(
    layout: KVLayout, num_blocks: int, payload: torch.Tensor, out: torch.Tensor
) -> None:
    """Quantize a chunk ``payload`` (as written by ``gather``) into the packed ``out``."""
    groups, piece = _groups(layout, num_blocks), layout.piece_elems
    src = _check(layout, payload, layout.chunk_nbytes(num_blocks), "payload")
    dst = _check(layout, out, quantized_nbytes(layout, num_blocks), "out")
    x = src.view(layout.dtype).view(groups, piece).float()
    absmax = x.abs().amax(dim=1)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("payload holds inf or NaN; it cannot be quantized")
    scale = absmax / QMAX
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(x * inv[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    dst[: groups * piece].view(torch.int8).view(groups, piece).copy_(q)
    dst[groups * piece :].view(torch.float32).copy_(scale)


def dequantize_int8(
    layout: KVLayout, num_blocks: int, packed: torch.Tensor, out: torch.Tensor
) -> None:
    """Expand a packed quantized chunk into a payload ``out`` ready for ``scatter``."""
    groups, piece = _groups(layout, num_blocks), layout.piece_elems
    src = _check(layout, packed, quantized_nbytes(layout, num_blocks), "packed")
    dst = _check(layout, out, layout.chunk_nbytes(num_blocks), "out")
    q = src[: groups * piece].view(torch.int8).view(groups, piece)
    scale = src[groups * piece :].view(torch.float32)
    x = q.float() * scale[:, None]
    dst.view(layout.dtype).view(groups, piece).copy_(x)


def error_bound(layout: KVLayout, num_blocks: int, packed: torch.Tensor) -> torch.Tensor:
    """Per-group bound on ``|x - dequantize(quantize(x))|`` (before the final cast)."""
    groups, piece = _groups(layout, num_blocks), layout.piece_elems
    src = _check(layout, packed, quantized_nbytes(layout, num_blocks), "packed")
    return src[groups * piece :].view(torch.float32) / 2
