"""Layered loads on a GPU: when attention can start, with ``layer_loads`` off and on.

``python -m tests.gpu.layered_loads --json F`` (CUDA; tests/gpu/run.sh runs it with the vLLM
stand-in on the path). The connector's real ``WorkerSide`` loads a 2,048-token prompt
(8 chunks, a Llama-3-8B-like cache: 32 layers x 8 KV heads x 128, bfloat16, 256 MiB) from a
pinned arena (the unit tests' fake agent) and the "forward pass" is 32 stand-in attention
layers, one bf16 matmul each, each issued after ``wait_for_layer_load`` of its layer, as
vLLM's attention does. Timed with CUDA events from the ``start_load_kv`` call: layer 0
usable, the last layer's matmul done; the engine thread's time in ``start_load_kv``; and
the step's wall time up to ``get_block_ids_with_load_errors`` (where the ``verify_loads``
hashes, run on threads while the copy goes, are settled), with ``verify_loads`` on and off,
and layered loads with several ``LAYER_JOB_PROGRAMS``.
Baselines in the same run: the 32 matmuls alone, and the copy alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from meshkv.chunk import ChunkKey, payload_checksum
from meshkv.integrations.vllm.config import ConnectorConfig
from meshkv.integrations.vllm.layout import EngineLayout
from meshkv.integrations.vllm.metadata import ChunkLoad, LoadSpec, MeshKVConnectorMetadata
from meshkv.integrations.vllm.stats import ConnectorCounters
from meshkv.integrations.vllm.worker import WorkerSide
from meshkv.kernels import ops
from tests.unit.test_vllm_worker_side import FakeWorkerAgent

LAYERS, HEADS, HEAD, BS, CHUNK, CHUNKS = 32, 8, 128, 16, 256, 8
PER_CHUNK = CHUNK // BS
LAYOUT = EngineLayout(
    model="bench", dtype="bfloat16", layer_names=tuple(f"l{i}" for i in range(LAYERS)),
    num_kv_heads=HEADS, head_size=HEAD, block_size=BS, packing="test", tp_size=1, cache_salt="",
)  # fmt: skip


def _agent() -> tuple[FakeWorkerAgent, list[ChunkKey]]:
    chunk_bytes = LAYERS * PER_CHUNK * HEADS * BS * 2 * HEAD * 2
    agent = FakeWorkerAgent(size=CHUNKS * chunk_bytes)
    keys = [ChunkKey(i.to_bytes(16, "big")) for i in range(CHUNKS)]
    slots = agent.reserve(keys, [chunk_bytes] * CHUNKS)
    rng = np.random.default_rng(0)
    for slot in slots:
        assert slot is not None
        np.frombuffer(slot.view, dtype=np.uint8)[:] = rng.integers(0, 256, chunk_bytes, np.uint8)
    agent.commit(keys, [CHUNK] * CHUNKS, [payload_checksum(s.view) for s in slots if s])
    return agent, keys


def _measure(
    layered: bool, verify: bool, programs: int, args: argparse.Namespace
) -> dict[str, float]:
    ops.LAYER_JOB_PROGRAMS = programs
    agent, keys = _agent()
    extra = {"socket": "/nowhere", "chunk_tokens": CHUNK, "layer_loads": layered}
    cfg = ConnectorConfig.from_extra_config({**extra, "verify_loads": verify}, {})
    side = WorkerSide(cfg, LAYOUT, ConnectorCounters(), 0, agent)
    blocks = CHUNKS * PER_CHUNK
    caches = {
        name: torch.zeros((blocks, HEADS, BS, 2 * HEAD), dtype=torch.bfloat16, device="cuda")
        for name in LAYOUT.layer_names
    }
    side.register_kv_caches(caches)
    chunks = tuple(
        ChunkLoad((k,), tuple((j, c * PER_CHUNK + j) for j in range(PER_CHUNK)), PER_CHUNK)
        for c, k in enumerate(keys)
    )
    meta = MeshKVConnectorMetadata(CHUNK, loads=[LoadSpec("r", chunks, is_async=False)])
    a = torch.randn(args.m, args.m, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(a)
    first, step, call, walls = [], [], [], []
    for r in range(args.repeats + 1):
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        t0 = time.perf_counter()
        ev[0].record()
        side.start_load_kv(meta)
        elapsed = time.perf_counter() - t0
        for i, name in enumerate(LAYOUT.layer_names):
            side.wait_for_layer_load(name)
            if i == 0:
                ev[1].record()
            torch.matmul(a, a, out=out)  # this layer's stand-in attention
        ev[2].record()
        torch.cuda.synchronize()  # vLLM's step waits for its output
        side.wait_for_save(MeshKVConnectorMetadata(CHUNK))
        side.get_finished()
        assert side.get_block_ids_with_load_errors() == set()  # the hashes are settled here
        wall = time.perf_counter() - t0
        if r:
            call.append(elapsed * 1e3)
            first.append(ev[0].elapsed_time(ev[1]))
            step.append(ev[0].elapsed_time(ev[2]))
            walls.append(wall * 1e3)
    # the loaded bytes are the arena's: chunk 0's first piece is layer 0 of its blocks
    got = caches[LAYOUT.layer_names[0]][:PER_CHUNK].contiguous().view(torch.uint8).flatten()
    want = torch.frombuffer(agent.arena, dtype=torch.uint8, count=got.numel())
    assert torch.equal(got.cpu(), want), "layered load copied the wrong bytes"
    side.close()
    agent.close()
    return {
        "engine_thread_ms": statistics.median(call),
        "layer0_ready_ms": statistics.median(first),
        "gpu_step_ms": statistics.median(step),
        "step_wall_ms": statistics.median(walls),
    }


def _baselines(args: argparse.Namespace) -> dict[str, float]:
    a = torch.randn(args.m, args.m, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(a)
    nbytes = CHUNKS * LAYERS * PER_CHUNK * HEADS * BS * 2 * HEAD * 2
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    compute, copy = [], []
    for r in range(args.repeats + 1):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        torch.cuda.synchronize()
        ev[0].record()
        for _ in range(LAYERS):
            torch.matmul(a, a, out=out)
        ev[1].record()
        dev.copy_(host, non_blocking=True)
        ev[2].record()
        torch.cuda.synchronize()
        if r:
            compute.append(ev[0].elapsed_time(ev[1]))
            copy.append(ev[1].elapsed_time(ev[2]))
    return {
        "compute_only_ms": statistics.median(compute),
        "h2d_copy_only_ms": statistics.median(copy),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--m", type=int, default=4096, help="stand-in attention: m x m matmul")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (this machine has none); make test-gpu runs it")
    results: dict[str, object] = {"baselines": _baselines(args)}
    print(results["baselines"], flush=True)
    default = ops.LAYER_JOB_PROGRAMS
    runs = [(False, False, default), (False, True, default)]
    runs += [(True, True, p) for p in (0, 4, default, 16, 32)]
    for layered, verify, programs in runs:
        name = f"layer_loads={layered} verify_loads={verify}"
        if layered:
            name += f" job_programs={programs}"
        row = _measure(layered, verify, programs, args)
        results[name] = row
        print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
