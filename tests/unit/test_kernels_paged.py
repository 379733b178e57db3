"""The layout read off vLLM's own KV views, for every physical order vLLM allocates.

vLLM >= 0.32 hands every attention backend (CPU, FlashAttention, FlashInfer, Triton, MLA)
per-layer views ``(blocks, heads, block_size, content)`` laid out by one of its
``KVCacheLayout`` orders. These tests build those views with vLLM's own allocation code
(``compute_layout_strides`` + ``create_kv_cache_views``) where vLLM imports, or with the
same stride rule written out here where it does not (the GPU machine has no vLLM), then
check that ``KVLayout.from_engine_views`` reads them and that gather/scatter move exactly
each block's bytes, on every backend of this machine.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshkv.kernels import KVCaches, KVLayout, LayoutKind, triton_available

ORDERS = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}
PAGE = {"LBHNC": "HNC", "LBNHC": "NHC", "LHBNC": "NC", "BLHNC": "HNC", "BLNHC": "NHC"}
PAGE["BHLNC"] = "NC"
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAYERS, BLOCKS = 3, 12


def by_hand(order: str, heads: int, bs: int, content: int, dtype: torch.dtype, device: str):  # type: ignore[no-untyped-def]
    """Views of the logical ``[L, B, H, N, C]`` cache in ``order``, the rule vLLM uses."""
    shape = (LAYERS, BLOCKS, heads, bs, content)
    strides = [0] * 5
    step = 1
    for dim in reversed(ORDERS[order]):
        strides[dim] = step
        step *= shape[dim]
    raw = torch.randint(-100, 100, (step * dtype.itemsize,), dtype=torch.int8, device=device)
    whole = torch.as_strided(raw.view(dtype), shape, strides)
    return [whole[i] for i in range(LAYERS)]


def by_vllm(order: str, heads: int, bs: int, content: int, dtype: torch.dtype, mla: bool):  # type: ignore[no-untyped-def]
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheTensor,
        MLAAttentionSpec,
        compute_layout_strides,
        create_kv_cache_views,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout

    if mla:
        spec = MLAAttentionSpec(block_size=bs, num_kv_heads=1, head_size=content, dtype=dtype)
    else:
        spec = FullAttentionSpec(
            block_size=bs, num_kv_heads=heads, head_size=content // 2, dtype=dtype
        )
    layout = KVCacheLayout[order]
    ls, bst, *_ = compute_layout_strides(spec, BLOCKS, LAYERS, layout)
    size = LAYERS * BLOCKS * spec.page_size_bytes
    names = [f"layer.{i}" for i in range(LAYERS)]
    tensor = KVCacheTensor(size=size, layers=names, layer_stride=ls, block_stride=bst)
    raw = torch.randint(-100, 100, (size,), dtype=torch.int8)
    return create_kv_cache_views(raw, spec, BLOCKS, layout, tensor)


def block_bytes(view: torch.Tensor, block: int, page: str) -> bytes:
    """The bytes of one block of one layer, in memory order, read without the kernels."""
    heads = view.shape[1]
    runs = [view[block]] if page != "NC" else [view[block, h] for h in range(heads)]
    out = b""
    for run in runs:
        # every stride is positive, so element [0, ...] is the run's lowest address
        flat = torch.as_strided(view, (run.numel(),), (1,), run.storage_offset())
        out += flat.contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return out


def expected_payload(views: list[torch.Tensor], ids: list[int], page: str) -> bytes:
    return b"".join(block_bytes(v, b, page) for v in views for b in ids)


CASES = [
    (order, dtype, bs)
    for order in ORDERS
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn)
    for bs in (16, 32)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("order", "dtype", "bs"), CASES, ids=str)
def test_every_vllm_order_round_trips_byte_exact(
    order: str, dtype: torch.dtype, bs: int, device: str
) -> None:
    heads, content = 4, 2 * 32
    if HAVE_VLLM and device == "cpu":
        views = by_vllm(order, heads, bs, content, dtype, mla=False)
    else:
        views = by_hand(order, heads, bs, content, dtype, device)
    lay = KVLayout.from_engine_views(views)
    assert lay.kind is LayoutKind.PAGED and lay.page == PAGE[order]
    assert (lay.num_kv_heads, lay.block_size, lay.head_size) == (heads, bs, content)
    backends = ["auto", "torch"] + (["triton"] if device == "cpu" and triton_available() else [])
    ids = [[5, 2], [11, 0]]
    for backend in backends:
        if backend == "triton" and (dtype.itemsize == 4 or bs == 32):
            continue  # the interpreter is slow: one word size and block size are enough here
        kv = KVCaches(views, lay, backend=backend)  # type: ignore[arg-type]
        outs = [torch.zeros(lay.chunk_nbytes(2), dtype=torch.uint8) for _ in ids]
        kv.gather_chunks(ids, outs)
        if device == "cuda":
            torch.cuda.synchronize()
        for chunk, out in zip(ids, outs, strict=True):
            got = out.numpy().tobytes()
            assert got == expected_payload(views, chunk, lay.page), (backend, chunk)
        fresh = _zeroed_like(views)
        KVCaches(fresh, lay, backend=backend).scatter_chunks(outs, ids)  # type: ignore[arg-type]
        if device == "cuda":
            torch.cuda.synchronize()
        for b in range(BLOCKS):
            moved = any(b in chunk for chunk in ids)
            for v, f in zip(views, fresh, strict=True):
                want = (
                    block_bytes(v, b, lay.page)
                    if moved
                    else bytes(len(block_bytes(v, b, lay.page)))
                )
                assert block_bytes(f, b, lay.page) == want, (backend, b)


def _zeroed_like(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zeroed views with the very same strides (``zeros_like`` would make them dense)."""
    base = views[0]
    lo = min(v.storage_offset() for v in views)
    hi = max(
        v.storage_offset() + sum((d - 1) * s for d, s in zip(v.shape, v.stride(), strict=True))
        for v in views
    )
    raw = torch.zeros(hi + 1, dtype=base.dtype, device=base.device)
    return [torch.as_strided(raw, v.shape, v.stride(), v.storage_offset() - lo) for v in views]


@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here")
@pytest.mark.parametrize("order", ["LBHNC", "LBNHC", "BLHNC"])
def test_mla_latent_views(order: str) -> None:
    views = by_vllm(order, 1, 16, 576, torch.bfloat16, mla=True)
    lay = KVLayout.from_engine_views(views)
    assert lay.num_kv_heads == 1 and lay.head_size == 576 and lay.page == "HNC"
    kv = KVCaches(views, lay)
    out = torch.zeros(lay.chunk_nbytes(1), dtype=torch.uint8)
    kv.gather_chunks([[7]], [out])
    assert out.numpy().tobytes() == expected_payload(views, [7], "HNC")


@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here")
def test_the_cpu_backends_order_moves_the_same_bytes_as_the_old_cpu_layout() -> None:
    """vLLM's CPU backend allocates LBHNC only: a chunk saved under the paged layout is
    byte-identical to one saved under ``KVLayout.vllm_cpu`` (the same engine bytes)."""
    views = by_vllm("LBHNC", 4, 32, 128, torch.bfloat16, mla=False)
    paged = KVLayout.from_engine_views(views)
    dense = [v.contiguous() for v in views]
    cpu = KVLayout.vllm_cpu(
        num_layers=LAYERS, num_kv_heads=4, block_size=32, head_size=64, dtype=torch.bfloat16
    )
    a = torch.zeros(paged.chunk_nbytes(2), dtype=torch.uint8)
    b = torch.zeros(cpu.chunk_nbytes(2), dtype=torch.uint8)
    KVCaches(views, paged).gather_chunks([[3, 9]], [a])
    KVCaches(dense, cpu).gather_chunks([[3, 9]], [b])
    assert torch.equal(a, b)


def test_views_the_kernels_cannot_move_are_refused_with_shape_and_strides() -> None:
    whole = torch.zeros(LAYERS, BLOCKS, 4, 16, 64)
    transposed = [whole[i].transpose(2, 3) for i in range(LAYERS)]  # content not innermost
    with pytest.raises(ValueError, match=r"shape \(12, 4, 64, 16\) with strides"):
        KVLayout.from_engine_views(transposed)
    with pytest.raises(ValueError, match="4-D"):
        KVLayout.from_engine_views([torch.zeros(2, BLOCKS, 16, 4, 64)])
    lay = KVLayout.from_engine_views([whole[i] for i in range(LAYERS)])
    other = by_hand("LBNHC", 4, 16, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="the layout says HNC"):
        KVCaches(other, lay)
