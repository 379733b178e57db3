"""The Triton block copy's launch shape on a GPU: tile and warps per program, swept.

``python -m benchmarks.kernel_tiles --json F`` (needs CUDA). For each cache geometry it
times batched gathers (device cache -> pinned host arena) and scatters (back) through
``KVCaches`` with every ``(tile, num_warps)`` in ``SHAPES`` and with ``launch_shape``'s own
choice, against ``copy_`` D2H / H2D of the same bytes, interleaved round by round so that
drift hits every arm alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from meshkv.kernels import KVCaches, KVLayout, LayoutKind, pin_host_memory, unpin_host_memory
from meshkv.kernels import triton_kernels as tk

SHAPES = [(1024, 4), (1024, 8), (512, 2), (512, 4), (256, 1), (256, 2), (128, 1)]
Case = tuple[str, LayoutKind, int, int, int, int, int]
#: name, kind, kv heads, head (content) size, block size, layers, MiB per round (0: --mib)
CASES: list[Case] = [
    ("flash_attn h8x128 bs16", LayoutKind.FLASH_ATTN, 8, 128, 16, 32, 0),
    ("mla 576 bs16", LayoutKind.MLA, 1, 576, 16, 61, 0),
    ("mla 576 bs64", LayoutKind.MLA, 1, 576, 64, 61, 0),
    ("mla 256 bs16", LayoutKind.MLA, 1, 256, 16, 32, 0),
    ("mla 256 bs16 64MiB", LayoutKind.MLA, 1, 256, 16, 32, 64),  # bench kernels' MLA round
]


def _case(case: Case, args: argparse.Namespace) -> list[dict[str, object]]:
    name, kind, heads, head, bs, layers, mib = case
    layout = KVLayout(kind, layers, bs, head, torch.bfloat16, heads)
    per_chunk = layout.blocks_per_chunk(256)
    chunk_bytes = layout.chunk_nbytes(per_chunk)
    chunks = max(1, (mib or args.mib) * 2**20 // chunk_bytes)
    working = chunks * per_chunk
    big = torch.empty(
        (layers, *layout.layer_shape(working * 2)), dtype=torch.bfloat16, device="cuda"
    )
    big.view(torch.uint8).random_()
    kv = KVCaches([big[i] for i in range(layers)], layout)
    total = chunk_bytes * chunks
    arena = torch.ones(total, dtype=torch.uint8)
    if not pin_host_memory(arena):
        raise RuntimeError("cudaHostRegister failed")
    outs = [arena[c * chunk_bytes : (c + 1) * chunk_bytes] for c in range(chunks)]
    src = torch.empty(total, dtype=torch.uint8, device="cuda").random_()
    ids = [[c * per_chunk + j for j in range(per_chunk)] for c in range(chunks)]
    auto = tk.launch_shape
    piece_words = layout.block_nbytes // layout.planes // 8

    def with_shape(shape: tuple[int, int] | None, fn: Callable[[], None]) -> Callable[[], object]:
        def run() -> None:
            tk.launch_shape = auto if shape is None else (lambda piece: shape)
            try:
                fn()
            finally:
                tk.launch_shape = auto

        return run

    arms: dict[str, Callable[[], object]] = {
        "D2H copy_": lambda: arena.copy_(src),
        "H2D copy_": lambda: src.copy_(arena),
    }
    for shape in [None, *SHAPES]:
        tag = "auto " + str(auto(piece_words)) if shape is None else str(shape)
        arms[f"gather {tag}"] = with_shape(shape, lambda: kv.gather_chunks(ids, outs))
        arms[f"scatter {tag}"] = with_shape(shape, lambda: kv.scatter_chunks(outs, ids))
    times: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(args.repeats + 1):
        for arm, fn in arms.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if r:
                times[arm].append(time.perf_counter() - t0)
    unpin_host_memory(arena)
    rows = []
    d2h = total / statistics.median(times["D2H copy_"]) / 1e9
    h2d = total / statistics.median(times["H2D copy_"]) / 1e9
    for arm, ts in times.items():
        gbps = total / statistics.median(ts) / 1e9
        base = h2d if arm.startswith(("scatter", "H2D")) else d2h
        ratio = round(gbps / base, 3)
        rows.append(
            {"case": name, "arm": arm, "gbps": round(gbps, 2), "ratio": ratio, "bytes": total}
        )
        print(f"{name:24s} {arm:28s} {gbps:7.2f} GB/s  {gbps / base:5.3f}x", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="bytes per round (MiB)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (this machine has none); make test-gpu runs it")
    rows = [r for case in CASES for r in _case(case, args)]
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
