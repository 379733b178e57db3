"""``meshkv bench kernels``: gather/scatter throughput against a plain copy of the same bytes.

For each device and layout it times, interleaved round by round so that machine noise hits
every arm alike: a batched gather of ``--chunks`` chunks into an arena, the batched
scatter back, the same chunks one call each (the connector's per-chunk path), and the
baseline, a plain ``copy_`` of a contiguous tensor of the same size into the same arena.
Each round uses other blocks (the cache holds ``--spread`` times the working set) so the
source is not cache-resident. Medians are reported; ratio = kernel / baseline.

On CUDA the arena is host memory, page-locked with ``pin_host_memory`` as the connector
does with the agent's shared-memory arena, so the kernel writes (gather) and reads (scatter)
it directly; the baselines are a plain ``copy_`` of the same bytes device-to-host (for
gathers) and host-to-device (for scatters) with the same pinned arena. The ``staged`` arms
use a pageable arena instead (the kernel copies into a device staging buffer, then one
``copy_`` crosses the bus): what an engine gets when pinning is refused.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshkv.bench.args import nonnegative_int, positive_int
from meshkv.bench.report import Report, Result

if TYPE_CHECKING:
    import torch

    from meshkv.kernels import KVCaches, KVLayout

DTYPES = ("float16", "bfloat16", "float32", "float8_e4m3fn")
KINDS = ("vllm_cpu", "flash_attn", "mla")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=positive_int, default=8, help="attention layers")
    parser.add_argument("--kv-heads", type=positive_int, default=4, help="KV heads per rank")
    parser.add_argument("--head-size", type=positive_int, default=64, help="elements per head")
    parser.add_argument(
        "--block-size", type=positive_int, default=128, help="tokens per engine block"
    )
    parser.add_argument("--chunk-tokens", type=positive_int, default=256, help="tokens per chunk")
    parser.add_argument("--chunks", type=positive_int, default=16, help="chunks moved per round")
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="KV element type")
    parser.add_argument(
        "--layouts", default="vllm_cpu", help=f"comma-separated layouts out of {','.join(KINDS)}"
    )
    parser.add_argument(
        "--ids",
        choices=("consecutive", "scattered"),
        default="consecutive",
        help="block ids of a chunk: one run, or spread over the cache",
    )
    parser.add_argument("--spread", type=positive_int, default=4, help="cache size / working set")
    parser.add_argument(
        "--repeats", type=positive_int, default=30, help="rounds (medians reported)"
    )
    parser.add_argument(
        "--threads",
        type=nonnegative_int,
        default=0,
        help="torch CPU threads (0: leave torch's default)",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cpu, +cuda"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from meshkv.kernels import KVLayout, LayoutKind

    devices = ["cpu"] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available")
            return 2
        devices.append("cuda")
    try:
        kinds = [LayoutKind(k.strip()) for k in args.layouts.split(",") if k.strip()]
    except ValueError as exc:
        print(f"--layouts: {exc}")
        return 2
    dtype = getattr(torch, args.dtype)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    report = Report(
        "kernels",
        meta={
            "layers": args.layers,
            "kv_heads": args.kv_heads,
            "head_size": args.head_size,
            "block_size": args.block_size,
            "chunk_tokens": args.chunk_tokens,
            "chunks": args.chunks,
            "dtype": args.dtype,
            "ids": args.ids,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
    )
    for device in devices:
        for kind in kinds:
            heads = 1 if kind is LayoutKind.MLA else args.kv_heads
            head = 2 * args.head_size if kind is LayoutKind.MLA else args.head_size
            layout = KVLayout(kind, args.layers, args.block_size, head, dtype, heads)
            try:
                per_chunk = layout.blocks_per_chunk(args.chunk_tokens)
            except ValueError as exc:
                print(exc)
                return 2
            _bench_one(report, layout, per_chunk, device, args)
    print(report.table())
    report.write(args.json)
    return 0


def _bench_one(
    report: Report, layout: KVLayout, per_chunk: int, device: str, args: argparse.Namespace
) -> None:
    import numpy as np
    import torch as t

    from meshkv.kernels import KVCaches

    spread = max(1, args.spread)
    working = args.chunks * per_chunk
    # one allocation for all layers, as vLLM's CPU backend does
    shape = (layout.num_layers, *layout.layer_shape(working * spread))
    big = t.empty(shape, dtype=layout.dtype, device=device)
    big.view(t.uint8).random_()
    layers = [big[i] for i in range(layout.num_layers)]
    chunk_bytes = layout.chunk_nbytes(per_chunk)
    total: int = chunk_bytes * args.chunks
    arena = t.ones(total, dtype=t.uint8)  # host memory, pre-faulted (written once)
    outs = [arena[c * chunk_bytes : (c + 1) * chunk_bytes] for c in range(args.chunks)]
    src = t.empty(total * spread, dtype=t.uint8, device=device).random_()
    sync = t.cuda.synchronize if device == "cuda" else _nothing
    cuda = device == "cuda"
    staged_outs: list[t.Tensor] = []
    if cuda:
        from meshkv.kernels import pin_host_memory

        if not pin_host_memory(arena):
            raise RuntimeError("could not page-lock the benchmark's arena (cudaHostRegister)")
        pageable = t.ones(total, dtype=t.uint8)
        staged_outs = [
            pageable[c * chunk_bytes : (c + 1) * chunk_bytes] for c in range(args.chunks)
        ]

    def table(round_: int) -> list[list[int]]:
        shift = (round_ % spread) * working
        if args.ids == "consecutive":
            return [
                [shift + c * per_chunk + j for j in range(per_chunk)] for c in range(args.chunks)
            ]
        # scattered: block j of chunk c is far from its neighbours, in reverse order
        return [
            [shift + (j * args.chunks + c) for j in reversed(range(per_chunk))]
            for c in range(args.chunks)
        ]

    def torch_copy(r: int) -> None:
        arena.copy_(src[(r % spread) * total :][:total])

    def torch_copy_h2d(r: int) -> None:
        src[(r % spread) * total :][:total].copy_(arena)

    def memcpy(r: int) -> None:  # single-threaded, like the numpy backend
        np.copyto(arena.numpy(), src.numpy()[(r % spread) * total :][:total])

    # Each backend runs in its own phase next to the baseline with the same threading:
    # torch's OpenMP workers keep spinning after a parallel copy and would slow down
    # whatever runs next, so mixing the phases would charge torch's cost to numpy.
    phases: list[dict[str, Callable[[int], None]]] = []
    rows: list[tuple[str, str]] = []  # (arm, baseline arm)
    for backend in ("auto", "torch"):
        kv = KVCaches(layers, layout, backend=backend)
        if backend != "auto" and kv.backend == KVCaches(layers, layout).backend:
            continue
        tag = f"{device} {layout.kind.value} {kv.backend}"
        phase = _kernel_arms(kv, table, outs, tag, per_chunk_too=backend == "auto")
        if cuda and backend == "auto":
            phase.update(_kernel_arms(kv, table, staged_outs, tag + " staged", per_chunk_too=False))
        base = "torch copy_"
        if kv.backend == "numpy":
            base = "memcpy"
            phase[base] = memcpy
        else:
            phase[base] = torch_copy
        bases = {base}
        if cuda:
            phase["torch copy_ H2D"] = torch_copy_h2d
            bases.add("torch copy_ H2D")
        for name in phase:
            if name not in bases:
                h2d = cuda and name.startswith("scatter")
                rows.append((name, "torch copy_ H2D" if h2d else base))
        phases.append(phase)

    times: dict[str, list[float]] = {}
    for phase in phases:
        for name in phase:
            times[name] = []
        for r in range(args.repeats + 1):
            for name, fn in phase.items():  # interleaved: noise hits every arm alike
                sync()
                start = time.perf_counter()
                fn(r)
                sync()
                if r:  # round 0 warms up (first touch, Triton compile)
                    times[name].append(time.perf_counter() - start)

    def gbps(name: str) -> float:
        return total / float(statistics.median(times[name])) / 1e9

    d2h = " D2H" if cuda else ""
    if "memcpy" in times:
        report.add(
            Result(
                f"memcpy {device}",
                gbps("memcpy"),
                "GB/s",
                total,
                "torch copy_",
                gbps("torch copy_"),
            )
        )
    for arm, base in rows:
        label = base if base.endswith("H2D") else base + d2h
        report.add(Result(arm, gbps(arm), "GB/s", total, label, gbps(base)))
    if cuda:
        from meshkv.kernels import unpin_host_memory

        unpin_host_memory(arena)


def _kernel_arms(
    kv: KVCaches,
    table: Callable[[int], list[list[int]]],
    outs: list[torch.Tensor],
    tag: str,
    *,
    per_chunk_too: bool,
) -> dict[str, Callable[[int], None]]:
    """Timed functions for one bound cache: batched calls, and one call per chunk."""

    def gather(r: int) -> None:
        kv.gather_chunks(table(r), outs)

    def scatter(r: int) -> None:
        kv.scatter_chunks(outs, table(r))

    arms: dict[str, Callable[[int], None]] = {f"gather {tag}": gather, f"scatter {tag}": scatter}
    if per_chunk_too:

        def gather_each(r: int) -> None:
            for ids, out in zip(table(r), outs, strict=True):
                kv.gather(ids, out)

        def scatter_each(r: int) -> None:
            for ids, out in zip(table(r), outs, strict=True):
                kv.scatter(out, ids)

        arms[f"gather per-chunk {tag}"] = gather_each
        arms[f"scatter per-chunk {tag}"] = scatter_each
    return arms


def _nothing() -> None:
    return None
