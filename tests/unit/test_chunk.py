"""Chunk keys, namespaces and the record header."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash

from meshkv.chunk import (
    RECORD_HEADER_BYTES,
    ROOT_KEY,
    Namespace,
    RecordHeader,
    as_key,
    chunk_keys,
    next_key,
    payload_checksum,
)
from meshkv.errors import ChecksumMismatch, ConfigError, NamespaceMismatch

GOLDEN = json.loads((Path(__file__).parent.parent / "golden" / "chunk_keys.json").read_text())


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["name"])
def test_golden_vectors(case: dict[str, object]) -> None:
    """Any change to namespace or key hashing breaks cross-version cache reuse: fail loudly."""
    fields = dict(case["namespace"])  # type: ignore[call-overload]
    ns = Namespace(**fields)
    assert ns.digest().hex() == case["namespace_digest"]
    keys = chunk_keys(ns.digest(), case["tokens"], case["chunk_tokens"])  # type: ignore[arg-type]
    assert [k.hex() for k in keys] == case["keys"]
    with_tail = chunk_keys(
        ns.digest(),
        case["tokens"],  # type: ignore[arg-type]
        case["chunk_tokens"],  # type: ignore[arg-type]
        include_partial=True,
    )
    assert [k.hex() for k in with_tail] == case["keys_with_partial"]


def test_key_formula_matches_architecture() -> None:
    """key_i = xxh3_128(namespace || key_{i-1} || uint32-LE tokens_i), key_{-1} = 16 zeros."""
    ns = Namespace(model="m").digest()
    tokens = list(range(10))
    k0 = xxhash.xxh3_128_digest(ns + bytes(16) + np.arange(0, 5, dtype="<u4").tobytes())
    k1 = xxhash.xxh3_128_digest(ns + k0 + np.arange(5, 10, dtype="<u4").tobytes())
    assert chunk_keys(ns, tokens, 5) == [k0, k1]
    assert next_key(ns, ROOT_KEY, tokens[:5]) == k0


def test_a_chunk_s_extra_changes_its_key_and_every_later_one() -> None:
    """``key_i = xxh3_128(ns || key_{i-1} || tokens_i || extra_i)``: a chunk holding an
    image's placeholder tokens gets the image's hash as its extra, so prompts with equal
    tokens and different images part there, and stay equal before it."""
    ns = Namespace(model="m").digest()
    tokens = list(range(40))
    plain = chunk_keys(ns, tokens, 8)
    image_a = chunk_keys(ns, tokens, 8, extras={2: b"|mm:a@3"})
    image_b = chunk_keys(ns, tokens, 8, extras={2: b"|mm:b@3"})
    assert plain[:2] == image_a[:2] == image_b[:2]
    assert len({*plain[2:], *image_a[2:], *image_b[2:]}) == 9  # all differ from chunk 2 on
    assert chunk_keys(ns, tokens, 8, extras={}) == plain
    k2 = xxhash.xxh3_128_digest(
        ns + plain[1] + np.arange(16, 24, dtype="<u4").tobytes() + b"|mm:a@3"
    )
    assert image_a[2] == k2 == next_key(ns, plain[1], tokens[16:24], b"|mm:a@3")


def test_keys_are_prefix_chained() -> None:
    ns = Namespace(model="m").digest()
    a = chunk_keys(ns, list(range(40)), 8)
    b = chunk_keys(ns, list(range(32)) + [999] * 8, 8)
    c = chunk_keys(ns, [1] + list(range(1, 40)), 8)
    assert a[:4] == b[:4] and a[4] != b[4]
    assert not set(a) & set(c), "a change in the first token changes every key"
    assert chunk_keys(ns, list(range(7)), 8) == []


def test_keys_deterministic_across_processes() -> None:
    code = (
        "from meshkv.chunk import Namespace, chunk_keys;"
        "print(chunk_keys(Namespace(model='m', cache_salt='s').digest(), range(64), 16)[-1].hex())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": str(seed)},
        ).stdout.strip()
        for seed in (1, 2)
    }
    here = chunk_keys(Namespace(model="m", cache_salt="s").digest(), range(64), 16)[-1].hex()  # type: ignore[arg-type]
    assert outs == {here}


def test_namespaces_isolate_keys() -> None:
    base = Namespace(model="m", num_layers=2, kv_heads=2, head_size=32, block_size=16)
    variants = [
        Namespace(model="m2", num_layers=2, kv_heads=2, head_size=32, block_size=16),
        Namespace(model="m", num_layers=3, kv_heads=2, head_size=32, block_size=16),
        Namespace(
            model="m", num_layers=2, kv_heads=2, head_size=32, block_size=16, dtype="bfloat16"
        ),
        Namespace(model="m", num_layers=2, kv_heads=2, head_size=32, block_size=16, tp_size=2),
        Namespace(model="m", num_layers=2, kv_heads=2, head_size=32, block_size=16, cache_salt="x"),
        Namespace(
            model="m", num_layers=2, kv_heads=2, head_size=32, block_size=16, extra={"lora": "a"}
        ),
    ]
    digests = {v.digest() for v in variants} | {base.digest()}
    assert len(digests) == len(variants) + 1
    tokens = list(range(64))
    assert (
        chunk_keys(base.digest(), tokens, 16)[0] != chunk_keys(variants[0].digest(), tokens, 16)[0]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": ""}, "model"),
        ({"model": "m", "num_layers": 0}, "num_layers"),
        ({"model": "m", "head_size": -1}, "head_size"),
        ({"model": "m", "tp_rank": 2, "tp_size": 2}, "tp_rank"),
    ],
)
def test_namespace_rejects_bad_fields(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Namespace(**kwargs)  # type: ignore[arg-type]


def test_bad_tokens_and_keys() -> None:
    ns = Namespace(model="m").digest()
    with pytest.raises(ValueError, match="32-bit"):
        chunk_keys(ns, [-1, 2], 1)
    with pytest.raises(ValueError, match="positive"):
        chunk_keys(ns, [1, 2], 0)
    with pytest.raises(ValueError, match="16 bytes"):
        as_key(b"short")
    assert as_key(bytearray(16)) == bytes(16)


def test_record_header_roundtrip_and_damage() -> None:
    ns = Namespace(model="m").digest()
    payload = np.random.default_rng(0).bytes(4096)
    key = chunk_keys(ns, range(16), 16)[0]
    header = RecordHeader(ns, key, 16, len(payload), payload_checksum(payload))
    raw = header.pack()
    assert len(raw) == RECORD_HEADER_BYTES
    assert RecordHeader.unpack(raw) == header
    header.verify(payload, ns)
    for i in range(len(raw)):
        damaged = bytearray(raw)
        damaged[i] ^= 0x01
        with pytest.raises(ChecksumMismatch):
            RecordHeader.unpack(damaged)
    with pytest.raises(ChecksumMismatch, match="truncated"):
        RecordHeader.unpack(raw[:10])
    flipped = bytearray(payload)
    flipped[100] ^= 0x80
    with pytest.raises(ChecksumMismatch, match="payload checksum"):
        header.verify(flipped)
    with pytest.raises(ChecksumMismatch, match="length"):
        header.verify(payload[:-1])
    with pytest.raises(NamespaceMismatch):
        header.verify(payload, Namespace(model="other").digest())
