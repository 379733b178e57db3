"""How an engine lays out its paged KV cache, and what a chunk payload looks like.

A chunk payload is opaque engine bytes: whole engine blocks, layer-major. For layer 0 the
chunk's blocks in order, then layer 1, and so on. Within one block of one layer the payload
holds the block's *planes* back to back: one plane for block-first layouts (vLLM's CPU
backend, MLA), two (K then V) for flash-attention's layout, whose K and V halves of a block
live in different places of the layer tensor.

Every layout reduces to the same picture, which the kernels work on: per layer, ``planes``
pieces of ``piece_elems`` contiguous elements per block.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Element types a KV cache may hold; the kernels copy them as same-sized integers.
SUPPORTED_DTYPES: frozenset[torch.dtype] = frozenset(
    {
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.uint8,
        torch.int8,
    }
)

#: The integer type of the same width, used to move elements without interpreting them
#: (some CPU ops are not implemented for fp8, and no op here needs the values).
WORD_DTYPES: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


class LayoutKind(enum.StrEnum):
    """The families of per-layer KV tensor shapes the kernels understand."""

    #: vLLM CPU backend: ``(num_blocks, num_kv_heads, block_size, 2 * head_size)``.
    VLLM_CPU = "vllm_cpu"
    #: flash-attention style: ``(2, num_blocks, block_size, num_kv_heads, head_size)``.
    FLASH_ATTN = "flash_attn"
    #: MLA latent cache: ``(num_blocks, block_size, head_size)``.
    MLA = "mla"
    #: vLLM >= 0.32's per-layer view of any backend: logical ``(num_blocks, num_kv_heads,
    #: block_size, content)`` (``content`` = K and V of one head, or an MLA latent) with one
    #: of the physical orders of vLLM's ``KVCacheLayout``. ``KVLayout.page`` says how one
    #: block of one layer sits in memory: ``HNC`` or ``NHC`` (one contiguous page) or
    #: ``NC`` (one contiguous piece per head, heads apart: the ``LHBNC``/``BHLNC`` orders).
    PAGED = "paged"


#: How a PAGED block of one layer is stored (see ``LayoutKind.PAGED``).
PAGE_ORDERS = ("HNC", "NHC", "NC")


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The shape of one engine's KV cache, minus the number of blocks.

    Two engines can exchange chunks only when their layouts are equal (and their
    instruction sets pack blocks the same way); ``describe()`` is meant to enter the
    namespace hash for that reason.
    """

    kind: LayoutKind
    """Which per-layer tensor shape (see ``LayoutKind``)."""
    num_layers: int
    """Number of attention layers with a KV cache on this rank."""
    block_size: int
    """Tokens per engine block."""
    head_size: int
    """Elements per head (for MLA: the latent width, e.g. 512 + 64)."""
    dtype: torch.dtype
    """Element type of the cache tensors."""
    num_kv_heads: int = 1
    """KV heads on this rank (must be 1 for MLA)."""
    page: str = ""
    """PAGED only: ``HNC``, ``NHC`` or ``NC`` (see ``LayoutKind.PAGED``). For PAGED,
    ``head_size`` counts the content elements per token and head (2 x head size for K+V)."""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, LayoutKind):
            raise TypeError(f"kind must be a LayoutKind, got {self.kind!r}")
        for name in ("num_layers", "block_size", "head_size", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            supported = ", ".join(sorted(str(d) for d in SUPPORTED_DTYPES))
            raise ValueError(f"KVLayout.dtype {self.dtype} is not supported ({supported})")
        if self.kind is LayoutKind.MLA and self.num_kv_heads != 1:
            raise ValueError(f"an MLA layout has one latent head, got {self.num_kv_heads}")
        if (self.kind is LayoutKind.PAGED) != (self.page != ""):
            raise ValueError("KVLayout.page is set for (and only for) the paged layout")
        if self.page and self.page not in PAGE_ORDERS:
            raise ValueError(f"KVLayout.page must be one of {PAGE_ORDERS}, got {self.page!r}")

    @classmethod
    def vllm_cpu(
        cls,
        *,
        num_layers: int,
        num_kv_heads: int,
        block_size: int,
        head_size: int,
        dtype: torch.dtype,
    ) -> KVLayout:
        """vLLM's CPU backend: blocks are copied whole, their packing is never read."""
        return cls(LayoutKind.VLLM_CPU, num_layers, block_size, head_size, dtype, num_kv_heads)

    @classmethod
    def flash_attn(
        cls,
        *,
        num_layers: int,
        num_kv_heads: int,
        block_size: int,
        head_size: int,
        dtype: torch.dtype,
    ) -> KVLayout:
        """flash-attention's ``(2, num_blocks, block_size, num_kv_heads, head_size)``."""
        return cls(LayoutKind.FLASH_ATTN, num_layers, block_size, head_size, dtype, num_kv_heads)

    @classmethod
    def mla(
        cls, *, num_layers: int, block_size: int, head_size: int, dtype: torch.dtype
    ) -> KVLayout:
        """A single latent tensor per layer, ``(num_blocks, block_size, head_size)``."""
        return cls(LayoutKind.MLA, num_layers, block_size, head_size, dtype, 1)

    @classmethod
    def from_engine_views(cls, kv_caches: Sequence[torch.Tensor]) -> KVLayout:
        """Read the layout off vLLM >= 0.32's per-layer views ``(B, H, N, C)`` — whatever
        the attention backend and the physical order (``KVCacheLayout``) — from their
        shape and strides alone. Raises ``ValueError`` naming the shape and strides when
        a block is not stored in one of the ways the kernels move (``PAGE_ORDERS``)."""
        if not kv_caches:
            raise ValueError("kv_caches is empty")
        t = kv_caches[0]
        if t.dim() != 4:
            raise ValueError(
                f"expected vLLM's 4-D (blocks, heads, block_size, content) view, got shape "
                f"{tuple(t.shape)}"
            )
        _, h, n, c = (int(d) for d in t.shape)
        _, s_h, s_n, s_c = t.stride()
        page = page_order(h, n, c, s_h, s_n, s_c)
        if page is None:
            raise ValueError(
                f"a KV view of shape {tuple(t.shape)} with strides {t.stride()} does not "
                "store a block as one page or as one piece per head; not supported"
            )
        return cls(LayoutKind.PAGED, len(kv_caches), n, c, t.dtype, h, page)

    @classmethod
    def from_tensors(cls, kind: LayoutKind, kv_caches: Sequence[torch.Tensor]) -> KVLayout:
        """Read a layout of ``kind`` off an engine's per-layer tensors (e.g. at registration)."""
        if not kv_caches:
            raise ValueError("kv_caches is empty")
        t = kv_caches[0]
        shape = tuple(t.shape)
        if kind is LayoutKind.VLLM_CPU and len(shape) == 4 and shape[3] % 2 == 0:
            return cls(kind, len(kv_caches), shape[2], shape[3] // 2, t.dtype, shape[1])
        if kind is LayoutKind.FLASH_ATTN and len(shape) == 5 and shape[0] == 2:
            return cls(kind, len(kv_caches), shape[2], shape[4], t.dtype, shape[3])
        if kind is LayoutKind.MLA and len(shape) == 3:
            return cls(kind, len(kv_caches), shape[1], shape[2], t.dtype, 1)
        raise ValueError(f"a tensor of shape {shape} does not fit the {kind.value} layout")

    @property
    def planes(self) -> int:
        """Separately stored pieces of one block in one layer (2 when K and V are apart;
        one per head for a paged ``NC`` layout)."""
        if self.kind is LayoutKind.PAGED:
            return self.num_kv_heads if self.page == "NC" else 1
        return 2 if self.kind is LayoutKind.FLASH_ATTN else 1

    @property
    def block_dim(self) -> int:
        """Index of the block dimension in a layer tensor (flash-attention's K/V dim is 0)."""
        return 1 if self.kind is LayoutKind.FLASH_ATTN else 0

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one plane of one block (the dims after the block dimension)."""
        if self.kind is LayoutKind.VLLM_CPU:
            return (self.num_kv_heads, self.block_size, 2 * self.head_size)
        if self.kind is LayoutKind.PAGED:
            if self.page == "NC":
                return (self.block_size, self.head_size)
            return (self.num_kv_heads, self.block_size, self.head_size)
        if self.kind is LayoutKind.FLASH_ATTN:
            return (self.block_size, self.num_kv_heads, self.head_size)
        return (self.block_size, self.head_size)

    @property
    def piece_elems(self) -> int:
        """Elements in one plane of one block of one layer (contiguous in the engine)."""
        n = 1
        for d in self.block_shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def word_dtype(self) -> torch.dtype:
        """Integer type of the same width as ``dtype``: what the kernels actually move."""
        return WORD_DTYPES[self.itemsize]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block across all layers (what a chunk holds per block)."""
        return self.num_layers * self.planes * self.piece_elems * self.itemsize

    def layer_shape(self, num_blocks: int) -> tuple[int, ...]:
        """The shape each per-layer cache tensor must have."""
        if self.kind is LayoutKind.FLASH_ATTN:
            return (2, num_blocks, *self.block_shape)
        if self.kind is LayoutKind.PAGED:
            return (num_blocks, self.num_kv_heads, self.block_size, self.head_size)
        return (num_blocks, *self.block_shape)

    def chunk_nbytes(self, num_blocks: int) -> int:
        """Payload bytes of a chunk made of ``num_blocks`` engine blocks."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        return num_blocks * self.block_nbytes

    def blocks_per_chunk(self, chunk_tokens: int) -> int:
        """Engine blocks in a chunk of ``chunk_tokens`` tokens (a multiple of block_size)."""
        if chunk_tokens <= 0 or chunk_tokens % self.block_size:
            raise ValueError(
                f"chunk_tokens ({chunk_tokens}) must be a positive multiple of the engine "
                f"block size ({self.block_size})"
            )
        return chunk_tokens // self.block_size

    def describe(self) -> str:
        """A stable text form, e.g. for the namespace hash."""
        dtype = str(self.dtype).removeprefix("torch.")
        page = f":{self.page}" if self.page else ""
        return (
            f"{self.kind.value}{page}:L{self.num_layers}:H{self.num_kv_heads}"
            f":B{self.block_size}:D{self.head_size}:{dtype}"
        )


def page_order(h: int, n: int, c: int, s_h: int, s_n: int, s_c: int) -> str | None:
    """How one block of one layer of a ``(B, H, N, C)`` view is stored (``PAGE_ORDERS``),
    from its strides; a dimension of size 1 may have any stride."""

    def at(size: int, stride: int, want: int) -> bool:
        return size == 1 or stride == want

    if not at(c, s_c, 1):
        return None
    if at(n, s_n, c) and at(h, s_h, n * c):
        return "HNC"
    if at(h, s_h, c) and at(n, s_n, h * c):
        return "NHC"
    if at(n, s_n, c):
        return "NC"  # one contiguous (N, C) piece per head, the heads apart
    return None


def chunk_nbytes(layout: KVLayout, num_blocks: int) -> int:
    """Payload bytes of a chunk of ``num_blocks`` engine blocks under ``layout``."""
    return layout.chunk_nbytes(num_blocks)
