"""Gather/scatter kernels against an independent, naive construction of the payload.

The torch path is checked on every device; the Triton kernel is checked against the torch
reference with ``assert_close`` (compiled on CUDA, in the Triton interpreter on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from pathlib import Path

import pytest
import torch

from meshkv.cli import bench_cmd
from meshkv.kernels import (
    Backend,
    KVCaches,
    KVLayout,
    LayoutKind,
    as_byte_tensor,
    chunk_nbytes,
    dequantize_int8,
    gather,
    pin_host_memory,
    quant,
    quantize_int8,
    quantized_nbytes,
    scatter,
    triton_available,
    unpin_host_memory,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn]
KINDS = [k for k in LayoutKind if k is not LayoutKind.PAGED]  # paged: test_kernels_paged.py
NUM_BLOCKS = 12
BACKENDS: list[Backend] = ["numpy", "torch", "triton"] if triton_available() else ["numpy", "torch"]
ID_PATTERNS = {
    "run": [4, 5, 6],  # one consecutive run: per-run copy
    "two_runs": [9, 10, 2],
    "scattered": [11, 0, 7, 3],  # >= 3 runs: index_select path
}


def make_layout(kind: LayoutKind, dtype: torch.dtype, block_size: int, layers: int = 3) -> KVLayout:
    if kind is LayoutKind.MLA:
        return KVLayout.mla(num_layers=layers, block_size=block_size, head_size=48, dtype=dtype)
    return KVLayout(kind, layers, block_size, 32, dtype, num_kv_heads=2)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(shape, device=device).to(dtype)


def make_caches(
    layout: KVLayout, device: str, *, shared: bool = True, num_blocks: int = NUM_BLOCKS
) -> list[torch.Tensor]:
    """Per-layer tensors: views of one allocation (as vLLM's CPU backend) or separate."""
    shape = layout.layer_shape(num_blocks)
    if shared:
        big = random_tensor((layout.num_layers, *shape), layout.dtype, device)
        return [big[i] for i in range(layout.num_layers)]
    return [random_tensor(shape, layout.dtype, device) for _ in range(layout.num_layers)]


def naive_payload(layout: KVLayout, caches: list[torch.Tensor], ids: list[int]) -> torch.Tensor:
    """The chunk bytes written out the slow, obvious way: layer, block, K part, V part."""
    parts = []
    for layer in caches:
        for b in ids:
            if layout.kind is LayoutKind.FLASH_ATTN:
                parts += [layer[0, b].reshape(-1), layer[1, b].reshape(-1)]
            else:
                parts.append(layer[b].reshape(-1))
    return torch.cat(parts).view(torch.uint8).reshape(-1)


def block_of(layout: KVLayout, layer: torch.Tensor, b: int) -> torch.Tensor:
    return layer[:, b] if layout.kind is LayoutKind.FLASH_ATTN else layer[b]


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact equality; fp8 (and raw payload bytes) compare as uint8 views."""
    if actual.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        actual, expected = actual.view(torch.uint8), expected.view(torch.uint8)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------- layouts


def test_chunk_size_of_the_benchmark_model() -> None:
    # FACTS.md: 8 layers, 4 KV heads of 64, fp16 -> 8 KiB per token, 2 MiB per 256 tokens
    lay = KVLayout.vllm_cpu(
        num_layers=8, num_kv_heads=4, block_size=128, head_size=64, dtype=torch.float16
    )
    blocks = lay.blocks_per_chunk(256)
    assert blocks == 2
    assert chunk_nbytes(lay, blocks) == 2 << 20
    assert lay.describe() == "vllm_cpu:L8:H4:B128:D64:float16"
    with pytest.raises(ValueError, match="multiple of the engine block size"):
        lay.blocks_per_chunk(200)


@pytest.mark.parametrize("kind", KINDS)
def test_layout_read_off_tensors(kind: LayoutKind) -> None:
    lay = make_layout(kind, torch.bfloat16, 16)
    caches = make_caches(lay, "cpu")
    assert KVLayout.from_tensors(kind, caches) == lay
    assert tuple(caches[0].shape) == lay.layer_shape(NUM_BLOCKS)


def test_layout_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        KVLayout.vllm_cpu(
            num_layers=2, num_kv_heads=2, block_size=0, head_size=32, dtype=torch.float16
        )
    with pytest.raises(ValueError, match="not supported"):
        KVLayout.mla(num_layers=2, block_size=16, head_size=32, dtype=torch.float64)
    with pytest.raises(ValueError, match="one latent head"):
        KVLayout(LayoutKind.MLA, 2, 16, 32, torch.float16, num_kv_heads=2)
    with pytest.raises(ValueError, match="does not fit the flash_attn layout"):
        KVLayout.from_tensors(LayoutKind.FLASH_ATTN, [torch.zeros(4, 2, 16, 64)])


# ------------------------------------------------------------- torch path, all devices


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", list(ID_PATTERNS))
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_gather_then_scatter_round_trip(
    kind: LayoutKind,
    dtype: torch.dtype,
    block_size: int,
    pattern: str,
    device: str,
    backend: Backend,
) -> None:
    lay = make_layout(kind, dtype, block_size)
    caches = make_caches(lay, device)
    ids = ID_PATTERNS[pattern]
    out = torch.empty(lay.chunk_nbytes(len(ids)), dtype=torch.uint8, device=device)
    gather(caches, ids, out, lay, backend=backend)
    assert_same(out, naive_payload(lay, caches, ids))

    fresh = [torch.zeros_like(c) for c in caches]
    scatter(out, fresh, torch.tensor(ids), lay, backend=backend)
    for src, dst in zip(caches, fresh, strict=True):
        for b in range(NUM_BLOCKS):
            want = block_of(lay, src, b) if b in ids else torch.zeros_like(block_of(lay, src, b))
            assert_same(block_of(lay, dst, b), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_separate_allocations_and_typed_buffers(kind: LayoutKind, device: str) -> None:
    lay = make_layout(kind, torch.bfloat16, 32)
    caches = make_caches(lay, device, shared=False)
    kv = KVCaches(caches, lay)
    assert kv.layer_groups == lay.num_layers
    ids = [3, 1, 2]
    out = torch.empty(lay.chunk_nbytes(3) // 2, dtype=torch.bfloat16, device=device)
    kv.gather(ids, out)
    assert_same(out.view(torch.uint8), naive_payload(lay, caches, ids))


def test_one_allocation_moves_all_layers_as_one_group() -> None:
    lay = make_layout(LayoutKind.VLLM_CPU, torch.float16, 16, layers=4)
    assert KVCaches(make_caches(lay, "cpu"), lay).layer_groups == 1
    # layers interleaved block by block inside one allocation: still one strided group
    inter = torch.randn(NUM_BLOCKS, 4, *lay.block_shape).to(torch.float16)
    caches = [inter[:, i] for i in range(4)]
    kv = KVCaches(caches, lay)
    assert kv.layer_groups == 1
    out = torch.empty(lay.chunk_nbytes(3), dtype=torch.uint8)
    kv.gather([5, 6, 0], out)
    assert_same(out, naive_payload(lay, caches, [5, 6, 0]))


@pytest.mark.parametrize("device", DEVICES)
def test_batched_chunks_match_single_calls(device: str) -> None:
    lay = make_layout(LayoutKind.VLLM_CPU, torch.float16, 16)
    caches = make_caches(lay, device)
    kv = KVCaches(caches, lay)
    table = [[0, 1], [2, 3], [8, 5, 6]]  # a short tail chunk is allowed
    sizes = [lay.chunk_nbytes(len(t)) for t in table]
    arena = torch.empty(sum(sizes) + 64, dtype=torch.uint8, device=device)
    outs, at = [], 64
    for n in sizes:
        outs.append(arena[at : at + n])
        at += n
    kv.gather_chunks(table, outs)
    for ids, out in zip(table, outs, strict=True):
        assert_same(out, naive_payload(lay, caches, ids))

    fresh = [torch.zeros_like(c) for c in caches]
    KVCaches(fresh, lay).scatter_chunks(outs, table)
    for ids in table:
        assert_same(naive_payload(lay, fresh, ids), naive_payload(lay, caches, ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_scatter_by_positions(backend: Backend) -> None:
    """Load only the blocks of a chunk the engine lacks, straight from the whole chunk."""
    lay = make_layout(LayoutKind.FLASH_ATTN, torch.float16, 16)
    caches = make_caches(lay, "cpu")
    whole = torch.empty(lay.chunk_nbytes(4), dtype=torch.uint8)
    KVCaches(caches, lay).gather([0, 1, 2, 3], whole)
    fresh = [torch.zeros_like(c) for c in caches]
    KVCaches(fresh, lay, backend=backend).scatter(whole, [9, 10, 4], positions=[1, 2, 3])
    for src, dst in zip(caches, fresh, strict=True):
        assert_same(dst[:, 9:11], src[:, 1:3])
        assert_same(dst[:, 4], src[:, 3])
        assert int(dst[:, [0, 1, 2, 3, 5, 6, 7, 8, 11]].view(torch.uint8).count_nonzero()) == 0
    kv = KVCaches(fresh, lay, backend=backend)
    with pytest.raises(ValueError, match="must be distinct and within the buffer's 4 blocks"):
        kv.scatter(whole, [1, 2], positions=[3, 4])
    with pytest.raises(ValueError, match="2 positions for 3 block ids"):
        kv.scatter(whole, [1, 2, 3], positions=[0, 1])
    with pytest.raises(TypeError, match="0.0 is not an integer block id"):
        kv.scatter(whole, [1], positions=[0.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not a whole number of"):
        kv.scatter(whole[:-2], [1], positions=[0])


def test_numpy_and_torch_backends_agree_on_layer_groups() -> None:
    lay = make_layout(LayoutKind.VLLM_CPU, torch.float32, 32, layers=4)
    caches = make_caches(lay, "cpu", shared=False)[:2] + make_caches(lay, "cpu")[:2]
    outs = []
    backends: tuple[Backend, ...] = ("numpy", "torch")
    for backend in backends:
        kv = KVCaches(caches, lay, backend=backend)
        assert kv.layer_groups == 3  # two lone layers, then two sharing an allocation
        out = torch.empty(lay.chunk_nbytes(5), dtype=torch.uint8)
        kv.gather([8, 9, 1, 2, 3], out)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert_same(outs[0], naive_payload(lay, caches, [8, 9, 1, 2, 3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_caches_from_another_thread(backend: Backend) -> None:
    """vLLM allocates under inference_mode; the connector may copy from a plain thread."""
    lay = make_layout(LayoutKind.VLLM_CPU, torch.float16, 16)
    with torch.inference_mode():
        caches = make_caches(lay, "cpu")
    assert caches[0].is_inference()
    kv = KVCaches(caches, lay, backend=backend)
    out = torch.empty(lay.chunk_nbytes(2), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(kv.gather, [1, 2], out).result(timeout=60)
        pool.submit(kv.scatter, out, [8, 9]).result(timeout=60)
    for layer in caches:
        assert_same(layer[8:10], layer[1:3])


def test_shared_memory_slot_round_trip() -> None:
    """The connector's case: gather into, and scatter from, a POSIX shared-memory slot."""
    lay = make_layout(LayoutKind.VLLM_CPU, torch.bfloat16, 32)
    caches = make_caches(lay, "cpu")
    size = lay.chunk_nbytes(2)
    shm = shared_memory.SharedMemory(name=f"meshkv-test-{uuid.uuid4().hex}", create=True, size=size)
    try:
        assert shm.buf is not None
        slot = as_byte_tensor(shm.buf[:size])
        gather(caches, [7, 8], slot, lay)
        assert bytes(shm.buf[:size]) == naive_payload(lay, caches, [7, 8]).numpy().tobytes()
        fresh = [torch.zeros_like(c) for c in caches]
        for _ in range(2):  # read-only views never warn (warnings are errors here)
            leased = as_byte_tensor(shm.buf[:size].toreadonly())  # a read lease's view
            scatter(leased, fresh, [1, 2], lay)
        for src, dst in zip(caches, fresh, strict=True):
            assert_same(dst[1:3], src[7:9])
        del slot, leased  # tensors export the buffer; close() refuses while they live
    finally:
        shm.close()
        shm.unlink()


# ------------------------------------------------------------------ argument checks


@pytest.fixture
def bound() -> tuple[KVLayout, KVCaches]:
    lay = make_layout(LayoutKind.VLLM_CPU, torch.float16, 16)
    return lay, KVCaches(make_caches(lay, "cpu"), lay)


def test_rejects_mismatched_caches() -> None:
    lay = make_layout(LayoutKind.VLLM_CPU, torch.float16, 16)
    caches = make_caches(lay, "cpu")
    with pytest.raises(ValueError, match="layout has 3 layers but 2 KV tensors"):
        KVCaches(caches[:2], lay)
    with pytest.raises(TypeError, match=r"kv_caches\[1\] has dtype torch.bfloat16"):
        KVCaches([caches[0], caches[1].to(torch.bfloat16), caches[2]], lay)
    with pytest.raises(ValueError, match=r"kv_caches\[2\] has shape"):
        KVCaches([caches[0], caches[1], caches[2][:, :1]], lay)
    with pytest.raises(TypeError, match="sequence of per-layer tensors"):
        KVCaches(torch.stack(caches), lay)  # type: ignore[arg-type]
    # heads and tokens swapped in memory: same shape, blocks not contiguous
    swapped = [c.transpose(1, 2).contiguous().transpose(1, 2) for c in caches]
    with pytest.raises(ValueError, match="must be contiguous"):
        KVCaches(swapped, lay)
    with pytest.raises(ValueError, match="backend must be 'auto', 'numpy'"):
        KVCaches(caches, lay, backend="cuda")  # type: ignore[arg-type]


def test_rejects_bad_buffers(bound: tuple[KVLayout, KVCaches]) -> None:
    lay, kv = bound
    need = lay.chunk_nbytes(2)
    with pytest.raises(ValueError, match=f"holds {need - 2} bytes; 2 block.* take {need} bytes"):
        kv.gather([0, 1], torch.empty(need - 2, dtype=torch.uint8))
    with pytest.raises(TypeError, match="has dtype torch.float32; use torch.uint8"):
        kv.gather([0, 1], torch.empty(need // 4, dtype=torch.float32))
    with pytest.raises(ValueError, match="contiguous 1-D buffer"):
        kv.gather([0, 1], torch.empty(2, need // 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not aligned to 2 bytes"):
        kv.gather([0, 1], torch.empty(need + 1, dtype=torch.uint8)[1:])
    with pytest.raises(TypeError, match="must be a tensor"):
        kv.gather([0, 1], bytearray(need))  # type: ignore[arg-type]


def test_rejects_bad_block_ids(bound: tuple[KVLayout, KVCaches]) -> None:
    lay, kv = bound
    buf = torch.empty(lay.chunk_nbytes(2), dtype=torch.uint8)
    with pytest.raises(IndexError, match=f"block id {NUM_BLOCKS} is out of range"):
        kv.gather([0, NUM_BLOCKS], buf)
    with pytest.raises(IndexError, match="block id -1 is out of range"):
        kv.gather(torch.tensor([-1, 0]), buf)
    with pytest.raises(TypeError, match="1-D integer tensor"):
        kv.gather(torch.tensor([0.0, 1.0]), buf)
    with pytest.raises(TypeError, match="not an integer block id"):
        kv.gather([0, 1.0], buf)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no block ids"):
        kv.gather([], torch.empty(0, dtype=torch.uint8))
    with pytest.raises(ValueError, match="appears more than once"):
        kv.scatter(buf, [3, 3])
    with pytest.raises(ValueError, match="appears more than once"):
        kv.scatter_chunks([buf, buf], [[1, 2], [2, 4]])
    with pytest.raises(ValueError, match="2 block-id lists but 1 out buffers"):
        kv.gather_chunks([[0, 1], [2, 3]], [buf])
    # a failed call leaves the binding usable
    kv.gather([0, 1], buf)


# ----------------------------------------------------------- Triton vs torch reference

triton_only = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@triton_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_matches_reference(
    kind: LayoutKind, dtype: torch.dtype, block_size: int, device: str
) -> None:
    lay = make_layout(kind, dtype, block_size, layers=2)
    caches = make_caches(lay, device, shared=kind is not LayoutKind.FLASH_ATTN)
    table = [[5, 6], [11, 0, 3]]  # a run, then non-contiguous ids, in one launch
    ref = KVCaches(caches, lay, backend="torch")
    tri = KVCaches(caches, lay, backend="triton")
    want = [torch.empty(lay.chunk_nbytes(len(t)), dtype=torch.uint8, device=device) for t in table]
    got = [torch.full_like(w, 0xAB) for w in want]
    ref.gather_chunks(table, want)
    tri.gather_chunks(table, got)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)

    ref_dst = [torch.zeros_like(c) for c in caches]
    tri_dst = [torch.zeros_like(c) for c in caches]
    KVCaches(ref_dst, lay, backend="torch").scatter_chunks(want, table)
    KVCaches(tri_dst, lay, backend="triton").scatter_chunks(want, table)
    for t, r in zip(tri_dst, ref_dst, strict=True):
        assert_same(t, r)


@triton_only
@pytest.mark.parametrize("device", DEVICES)
def test_triton_narrow_words_for_unaligned_buffers(device: str) -> None:
    """Buffers only 2-byte aligned make the kernel move 2-byte words instead of 8."""
    lay = make_layout(LayoutKind.MLA, torch.float16, 16)
    caches = make_caches(lay, device, shared=False)
    n = lay.chunk_nbytes(2)
    arena = torch.zeros(2 * n + 2, dtype=torch.uint8, device=device)
    outs = [arena[2 : 2 + n], arena[2 + n : 2 + 2 * n]]
    table = [[1, 2], [5, 3]]
    KVCaches(caches, lay, backend="triton").gather_chunks(table, outs)
    for ids, out in zip(table, outs, strict=True):
        assert_same(out, naive_payload(lay, caches, ids))
    assert int(arena[:2].count_nonzero()) == 0  # nothing written before the first buffer
    fresh = [torch.zeros_like(c) for c in caches]
    KVCaches(fresh, lay, backend="triton").scatter_chunks(outs, table)
    for ids in table:
        assert_same(naive_payload(lay, fresh, ids), naive_payload(lay, caches, ids))


@triton_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("programs", [0, 1, 3])
def test_scatter_layers_moves_one_layer_per_call(
    kind: LayoutKind, device: str, programs: int
) -> None:
    """A layered load: the batch is prepared once, each call moves exactly one layer
    (the others stay untouched until their call), whole and partial chunks alike, with
    one program per block or a few looping over the blocks."""
    lay = make_layout(kind, torch.bfloat16, 16)
    caches = make_caches(lay, device, shared=False)
    table = [[5, 6], [11, 0, 3]]
    bufs = [torch.empty(lay.chunk_nbytes(len(t)), dtype=torch.uint8, device=device) for t in table]
    KVCaches(caches, lay).gather_chunks(table, bufs)
    fresh = [torch.zeros_like(c) for c in caches]
    dst = KVCaches(fresh, lay, backend="triton")
    # chunk 1 partly computed by the engine: only its blocks 0 and 2 are loaded, to 8 and 9
    copy = dst.scatter_layers(
        bufs, [[1, 2], [8, 9]], positions=[None, [0, 2]], job_programs=programs
    )
    for layer in range(lay.num_layers):
        copy(layer)
        for i, t in enumerate(fresh):
            loaded = i <= layer
            for got, src in ((1, 5), (2, 6), (8, 11), (9, 3)):
                want = block_of(lay, caches[i], src)
                if loaded:
                    assert_same(block_of(lay, t, got), want)
                else:
                    assert not block_of(lay, t, got).view(torch.uint8).any()
    with pytest.raises(IndexError, match="layer 3 is not one of the cache's 3 layers"):
        copy(3)
    with pytest.raises(ValueError, match="job_programs must be >= 0, got -1"):
        dst.scatter_layers(bufs, [[1, 2], [8, 9]], job_programs=-1)
    with pytest.raises(ValueError, match="needs the Triton backend, not torch"):
        KVCaches(fresh, lay, backend="torch").scatter_layers(bufs, table)


def test_launch_shape_keeps_lanes_busy() -> None:
    pytest.importorskip("triton")
    from meshkv.kernels.triton_kernels import launch_shape

    assert launch_shape(2304) == (256, 1)  # an MLA block of 16 x 576 bf16: 9 full tiles
    assert launch_shape(4096) == (256, 1)
    assert launch_shape(100) == (128, 1)  # fewest idle lanes when no tile fits well
    with pytest.raises(ValueError, match="piece must be positive"):
        launch_shape(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_a_refused_pin_leaves_cuda_usable() -> None:
    """cudaHostRegister of a range that overlaps a registered one fails; the failure must
    not surface as an error of the next, unrelated CUDA call (seen on an H200)."""
    big = torch.zeros(1 << 21, dtype=torch.uint8)
    inner = big[1 << 20 :]
    assert pin_host_memory(inner)
    try:
        assert not pin_host_memory(big)  # overlaps: refused, copies would be staged
        x = torch.tensor([1, 2, 3], device="cuda") + 1  # raised the refusal before the fix
        assert x.tolist() == [2, 3, 4]
    finally:
        unpin_host_memory(inner)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_cache_with_host_buffers() -> None:
    """Device-to-host gather and host-to-device scatter through the staging buffer."""
    lay = make_layout(LayoutKind.FLASH_ATTN, torch.float16, 16)
    caches = make_caches(lay, "cuda", shared=False)
    kv = KVCaches(caches, lay)
    assert kv.backend == "triton"
    host = [torch.empty(lay.chunk_nbytes(2), dtype=torch.uint8) for _ in range(2)]
    kv.gather_chunks([[1, 2], [7, 4]], host)
    assert_same(host[1], naive_payload(lay, caches, [7, 4]).cpu())
    fresh = [torch.zeros_like(c) for c in caches]
    KVCaches(fresh, lay).scatter_chunks(host, [[1, 2], [7, 4]])
    torch.cuda.synchronize()
    assert_same(naive_payload(lay, fresh, [7, 4]), naive_payload(lay, caches, [7, 4]))


# --------------------------------------------------------------------- quantization


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_int8_quantization_round_trip_within_bound(kind: LayoutKind, dtype: torch.dtype) -> None:
    lay = make_layout(kind, dtype, 32)
    caches = make_caches(lay, "cpu")
    caches[1][..., :3] *= 40  # outliers: the scale of their groups grows, the bound too
    caches[2].zero_()  # all-zero groups come back exactly
    ids = [2, 7, 8]
    payload = torch.empty(lay.chunk_nbytes(3), dtype=torch.uint8)
    gather(caches, ids, payload, lay)
    packed = torch.empty(quantized_nbytes(lay, 3), dtype=torch.uint8)
    quantize_int8(lay, 3, payload, packed)
    if dtype is not torch.float32:
        assert packed.nbytes < 0.51 * payload.nbytes
    back = torch.empty_like(payload)
    dequantize_int8(lay, 3, packed, back)

    groups = lay.num_layers * 3 * lay.planes
    x = payload.view(dtype).view(groups, -1).float()
    y = back.view(dtype).view(groups, -1).float()
    cast_eps = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-23}[dtype]
    bound = quant.error_bound(lay, 3, packed)[:, None] * (1 + 1e-6) + y.abs() * cast_eps
    assert bool(((x - y).abs() <= bound).all())
    assert bool((bound[:, :1] > 0).any())  # the bound is not vacuous
    zero_groups = slice(2 * 3 * lay.planes, None)  # layer 2
    assert int(y[zero_groups].count_nonzero()) == 0

    fresh = [torch.zeros_like(c) for c in caches]
    scatter(back, fresh, ids, lay)  # a dequantized payload is an ordinary payload
    torch.testing.assert_close(
        naive_payload(lay, fresh, ids).view(dtype), back.view(dtype), rtol=0, atol=0
    )


def test_int8_quantization_rejects_bad_input() -> None:
    lay = make_layout(LayoutKind.VLLM_CPU, torch.float16, 16)
    payload = torch.zeros(lay.chunk_nbytes(1), dtype=torch.uint8)
    packed = torch.empty(quantized_nbytes(lay, 1), dtype=torch.uint8)
    with pytest.raises(ValueError, match="must be uint8 or torch.float16 and hold"):
        quantize_int8(lay, 2, payload, packed)
    payload.view(torch.float16)[5] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_int8(lay, 1, payload, packed)
    fp8 = make_layout(LayoutKind.VLLM_CPU, torch.float8_e4m3fn, 16)
    with pytest.raises(TypeError, match="cannot quantize a torch.float8_e4m3fn cache"):
        quantize_int8(fp8, 1, torch.zeros(fp8.chunk_nbytes(1), dtype=torch.uint8), packed)


# ------------------------------------------------------------------------ benchmark


def test_bench_cli_writes_report(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench_cmd.register(parser.add_subparsers(dest="command", required=True))
    path = tmp_path / "kernels.json"
    argv = ["bench", "kernels", "--json", str(path), "--layers", "2", "--kv-heads", "2"]
    argv += ["--head-size", "32", "--block-size", "32", "--chunk-tokens", "64"]
    argv += ["--chunks", "2", "--repeats", "3", "--device", "cpu"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    report = json.loads(path.read_text())
    names = {r["name"] for r in report["results"]}
    want = {"memcpy cpu", "gather cpu vllm_cpu numpy", "scatter cpu vllm_cpu numpy"}
    want |= {"gather per-chunk cpu vllm_cpu numpy", "gather cpu vllm_cpu torch"}
    assert want <= names
    for r in report["results"]:
        assert r["unit"] == "GB/s" and r["value"] > 0 and r["baseline_value"] > 0
        assert r["size_bytes"] == 2 * (2 * 2 * 32 * 64 * 2) * 2


def test_pin_host_memory_without_cuda_is_a_clear_no() -> None:
    buf = torch.zeros(4096, dtype=torch.uint8)
    if torch.cuda.is_available():
        assert pin_host_memory(buf)
        unpin_host_memory(buf)
    else:
        assert not pin_host_memory(buf)
    assert not pin_host_memory(torch.zeros(4, dtype=torch.uint8, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_cache_with_pinned_host_arena_is_direct(kind: LayoutKind) -> None:
    """A pinned arena (as the connector registers the agent's) is written and read by the
    kernel directly: byte-exact both ways, and no device staging buffer is allocated."""
    lay = make_layout(kind, torch.bfloat16, 16)
    caches = make_caches(lay, "cuda", shared=False)
    kv = KVCaches(caches, lay)
    arena = torch.zeros(2 * lay.chunk_nbytes(2) + 64, dtype=torch.uint8)
    assert pin_host_memory(arena)
    try:
        n = lay.chunk_nbytes(2)
        host = [arena[0:n], arena[n + 64 : 2 * n + 64]]
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        kv.gather_chunks([[1, 2], [7, 4]], host)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - before < 4096  # only the small job table
        assert_same(host[1], naive_payload(lay, caches, [7, 4]).cpu())
        fresh = [torch.zeros_like(c) for c in caches]
        KVCaches(fresh, lay).scatter_chunks(host, [[1, 2], [7, 4]])
        torch.cuda.synchronize()
        assert_same(naive_payload(lay, fresh, [7, 4]), naive_payload(lay, caches, [7, 4]))
    finally:
        unpin_host_memory(arena)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("module", ["benchmarks.kernel_tiles", "tests.gpu.layered_loads"])
def test_gpu_benchmarks_refuse_clearly_without_cuda(module: str) -> None:
    env = {**os.environ, "PYTHONPATH": "tests/gpu/vllm_stand_in"}
    done = subprocess.run(
        [sys.executable, "-m", module], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "needs a CUDA device (this machine has none)" in done.stderr
