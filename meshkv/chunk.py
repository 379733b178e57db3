"""Chunk identity: namespaces, prefix-chained keys, and the chunk record header.

A chunk is ``chunk_tokens`` consecutive tokens of one request's KV (all layers, one TP
rank). Its key is ``xxh3_128(namespace || previous key || tokens)``, so the key of chunk i
commits to every token before it: two prompts share key i exactly when they share the
whole prefix up to the end of chunk i. Keys are deterministic across processes, machines
and restarts (no Python ``hash()``, no per-process seed); ``tests/golden`` pins them.

The record header travels in front of every payload that leaves the arena (SSD files and
peer frames). It carries its own checksum, so a flipped header byte is caught as surely as
a flipped payload byte.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import NewType

import msgpack
import numpy as np
import xxhash

from meshkv.errors import ChecksumMismatch, ConfigError, NamespaceMismatch

KEY_BYTES = 16
ChunkKey = NewType("ChunkKey", bytes)
"""16-byte prefix-chained content hash of a chunk."""

NamespaceId = NewType("NamespaceId", bytes)
"""16-byte digest of a ``Namespace``."""

ROOT_KEY = ChunkKey(bytes(KEY_BYTES))
"""The 'previous key' of a request's first chunk."""

_NAMESPACE_DOMAIN = b"meshkv-namespace-v1"


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything that makes two engines' KV bytes incompatible.

    Two engines may share a chunk only when every field is equal; the digest is the
    namespace id that is mixed into every key.
    """

    model: str
    """Model id or path as the engine names it."""
    revision: str = ""
    """Model revision (commit) if known."""
    dtype: str = "float16"
    """KV cache dtype."""
    num_layers: int = 1
    """Attention layers whose KV is stored."""
    kv_heads: int = 1
    """KV heads per tensor-parallel rank."""
    head_size: int = 64
    """Elements per head."""
    block_size: int = 16
    """Engine block size in tokens."""
    layout: str = "opaque"
    """Engine block packing / attention backend (e.g. ``vllm-cpu-avx512``)."""
    tp_rank: int = 0
    """Tensor-parallel rank this chunk belongs to."""
    tp_size: int = 1
    """Tensor-parallel world size."""
    cache_salt: str = ""
    """Per-tenant salt, LoRA adapter id, or anything else that must isolate caches."""
    extra: dict[str, str] = field(default_factory=dict)
    """Further engine-specific fields; included in the digest."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("namespace: model must be a non-empty string")
        for name in ("num_layers", "kv_heads", "head_size", "block_size", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"namespace: {name} must be a positive integer, got {value!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ConfigError(
                f"namespace: tp_rank {self.tp_rank} outside [0, tp_size={self.tp_size})"
            )

    def digest(self) -> NamespaceId:
        """The 16-byte namespace id (xxh3-128 of a canonical msgpack encoding)."""
        fields = asdict(self)
        fields["extra"] = sorted(self.extra.items())
        canonical = msgpack.packb(sorted(fields.items()), use_bin_type=True)
        return NamespaceId(xxhash.xxh3_128_digest(_NAMESPACE_DOMAIN + canonical))


def _tokens_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError("tokens must be a 1-D sequence of token ids")
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in an unsigned 32-bit integer")
    return arr.astype("<u4", copy=False).tobytes()


def next_key(
    namespace: NamespaceId, previous: ChunkKey, tokens: Sequence[int], extra: bytes = b""
) -> ChunkKey:
    """``key_i = xxh3_128(namespace || key_{i-1} || uint32-LE tokens_i || extra_i)``.

    ``extra``: what the chunk's token ids do not say about its KV (the multimodal inputs
    whose placeholder tokens it holds, its prompt embeddings); empty for plain text, so
    the keys of text chunks do not depend on it."""
    if len(namespace) != KEY_BYTES or len(previous) != KEY_BYTES:
        raise ValueError("namespace and previous key must be 16 bytes")
    return ChunkKey(xxhash.xxh3_128_digest(namespace + previous + _tokens_bytes(tokens) + extra))


def chunk_keys(
    namespace: NamespaceId,
    tokens: Sequence[int] | np.ndarray,
    chunk_tokens: int,
    *,
    include_partial: bool = False,
    extras: Mapping[int, bytes] | None = None,
) -> list[ChunkKey]:
    """Keys of the full chunks of ``tokens`` (plus the trailing partial one if asked).
    ``extras``: chunk index → the bytes :func:`next_key` appends for that chunk."""
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be positive")
    raw = _tokens_bytes(tokens)
    step = chunk_tokens * 4
    full = len(raw) // step
    ends = [(i + 1) * step for i in range(full)]
    if include_partial and len(raw) % step:
        ends.append(len(raw))
    keys: list[ChunkKey] = []
    previous: bytes = ROOT_KEY
    start = 0
    for i, end in enumerate(ends):
        extra = extras.get(i, b"") if extras else b""
        previous = xxhash.xxh3_128_digest(namespace + previous + raw[start:end] + extra)
        keys.append(ChunkKey(previous))
        start = end
    return keys


def as_key(value: bytes | bytearray | memoryview) -> ChunkKey:
    """Validate that ``value`` is a 16-byte key (raises ``ValueError`` otherwise)."""
    raw = bytes(value)
    if len(raw) != KEY_BYTES:
        raise ValueError(f"chunk key must be {KEY_BYTES} bytes, got {len(raw)}")
    return ChunkKey(raw)


def payload_checksum(payload: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of a chunk payload."""
    return xxhash.xxh3_64_intdigest(payload)


# --- record header -------------------------------------------------------------------

RECORD_MAGIC = b"MKVC"
RECORD_VERSION = 1
# magic, version, flags, namespace, key, num_tokens, payload_len, payload_checksum
_BODY = struct.Struct("<4sHH16s16sIQQ")
_TRAILER = struct.Struct("<Q")
RECORD_HEADER_BYTES = _BODY.size + _TRAILER.size
MAX_PAYLOAD_BYTES = 1 << 30
"""No single chunk may exceed 1 GiB; larger lengths are treated as corruption."""


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """Header of a chunk record on disk and on the wire."""

    namespace: NamespaceId
    key: ChunkKey
    num_tokens: int
    payload_len: int
    checksum: int
    flags: int = 0

    def __post_init__(self) -> None:
        if len(self.namespace) != KEY_BYTES or len(self.key) != KEY_BYTES:
            raise ValueError("record header: namespace and key must be 16 bytes")
        if not 0 <= self.payload_len <= MAX_PAYLOAD_BYTES:
            raise ValueError(f"record header: payload length {self.payload_len} out of range")
        if not 0 <= self.num_tokens < 1 << 32:
            raise ValueError("record header: num_tokens out of range")

    def pack(self) -> bytes:
        body = _BODY.pack(
            RECORD_MAGIC,
            RECORD_VERSION,
            self.flags,
            self.namespace,
            self.key,
            self.num_tokens,
            self.payload_len,
            self.checksum,
        )
        return body + _TRAILER.pack(xxhash.xxh3_64_intdigest(body))

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> RecordHeader:
        """Parse and verify a header; raises ``ChecksumMismatch`` on any damage."""
        if len(raw) < RECORD_HEADER_BYTES:
            raise ChecksumMismatch(
                f"record header truncated: {len(raw)} of {RECORD_HEADER_BYTES} bytes"
            )
        body = bytes(raw[: _BODY.size])
        (trailer,) = _TRAILER.unpack_from(raw, _BODY.size)
        if xxhash.xxh3_64_intdigest(body) != trailer:
            raise ChecksumMismatch("record header checksum mismatch")
        magic, version, flags, ns, key, num_tokens, payload_len, checksum = _BODY.unpack(body)
        if magic != RECORD_MAGIC:
            raise ChecksumMismatch(f"bad record magic {magic!r}")
        if version != RECORD_VERSION:
            raise ChecksumMismatch(f"unsupported record version {version}")
        try:
            return cls(NamespaceId(ns), ChunkKey(key), num_tokens, payload_len, checksum, flags)
        except ValueError as exc:
            raise ChecksumMismatch(str(exc)) from exc

    def verify(
        self, payload: bytes | bytearray | memoryview, namespace: NamespaceId | None = None
    ) -> None:
        """Raise unless ``payload`` matches this header (and ``namespace`` if given)."""
        if namespace is not None and namespace != self.namespace:
            raise NamespaceMismatch("record belongs to another namespace")
        if len(payload) != self.payload_len:
            raise ChecksumMismatch(f"payload length {len(payload)} != header's {self.payload_len}")
        if payload_checksum(payload) != self.checksum:
            raise ChecksumMismatch("payload checksum mismatch")
