"""Moving whole engine KV blocks between an engine's paged cache and chunk buffers.

``gather`` copies blocks of every layer into a contiguous, layer-major chunk payload (for
saving); ``scatter`` copies a payload back into blocks (for loading). The layout of the
engine's tensors is given explicitly as a ``KVLayout``; payload bytes are never
interpreted. Bind an engine's tensors once with ``KVCaches`` and reuse it on hot paths.
Optional int8 quantization of payloads lives in ``quant``.
"""

from .layouts import KVLayout, LayoutKind, chunk_nbytes
from .ops import (
    Backend,
    BlockIds,
    KVCaches,
    as_byte_tensor,
    gather,
    pin_host_memory,
    scatter,
    triton_available,
    unpin_host_memory,
)
from .quant import dequantize_int8, quantize_int8, quantized_nbytes

__all__ = [
    "Backend",
    "BlockIds",
    "KVCaches",
    "KVLayout",
    "LayoutKind",
    "as_byte_tensor",
    "chunk_nbytes",
    "dequantize_int8",
    "gather",
    "pin_host_memory",
    "quantize_int8",
    "quantized_nbytes",
    "scatter",
    "triton_available",
    "unpin_host_memory",
]
