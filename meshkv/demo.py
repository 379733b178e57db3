"""``python -m meshkv.demo`` (``make demo``): a live agent, chunks through the client, status.

Starts a real ``meshkv agent`` process on a private socket with a small CPU tier and an
SSD directory, stores the chunks of a fake prompt through ``AgentClient`` (zero-copy:
reserve, copy into the arena, commit), looks up a second prompt that shares a prefix,
loads the shared chunks back and checks them byte for byte, prints the agent's status,
and shuts the agent down with SIGTERM. Later this grows into the mesh + vLLM demo.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from meshkv.chunk import Namespace, chunk_keys
from meshkv.cli.status_cmd import render
from meshkv.client import AgentClient

CHUNK_TOKENS = 256
CHUNK_BYTES = 2 << 20  # 2 MiB: 256 tokens of an 8-layer model at 8 KiB of KV per token


def start_agent(workdir: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    ready = workdir / "ready.json"
    ssd = workdir / "ssd"
    ssd.mkdir()
    cmd = [
        sys.executable, "-m", "meshkv", "agent", "--node-id", "demo",
        "--socket", str(workdir / "agent.sock"), "--http", "127.0.0.1:0",
        "--ready-file", str(ready), "--cpu-gb", "0.25", "--ssd-dir", str(ssd),
        "--log-level", "warning",
    ]  # fmt: skip
    print("$", " ".join(cmd[2:]))
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the agent exited with {proc.returncode}")
        try:
            info: dict[str, Any] = json.loads(ready.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.05)
            continue
        return proc, info
    proc.kill()
    raise SystemExit("the agent did not become ready within 30 s")


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="meshkv-demo-", dir="/tmp"))
    proc, info = start_agent(workdir)
    try:
        print(
            f"agent ready: socket {info['socket']}, http {info['http']}, arena {info['arena_name']}"
        )
        ns = Namespace(model="demo-model", num_layers=8, kv_heads=4, head_size=64)
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, 32000, 8 * CHUNK_TOKENS)
        keys = chunk_keys(ns.digest(), prompt, CHUNK_TOKENS)
        payloads = [rng.integers(0, 256, CHUNK_BYTES, dtype=np.uint8) for _ in keys]
        with AgentClient(info["socket"], namespace=ns) as client:
            hello = client.hello()
            print(f"hello: protocol v{hello.version}, node {hello.node_id}, "
                  f"arena {hello.arena_size >> 20} MiB")  # fmt: skip
            t0 = time.perf_counter()
            slots = client.reserve(keys, [p.nbytes for p in payloads])
            for slot, data in zip(slots, payloads, strict=True):
                assert slot is not None
                np.copyto(np.frombuffer(slot.view, dtype=np.uint8), data)
            client.commit(keys, [CHUNK_TOKENS] * len(keys))
            del slot, slots  # views into the arena: drop them before the client closes
            stored = time.perf_counter() - t0
            print(f"stored {len(keys)} chunks ({len(keys) * CHUNK_BYTES >> 20} MiB) "
                  f"in {stored * 1e3:.1f} ms")  # fmt: skip

            # A second prompt shares the first 5 chunks, then diverges.
            other = np.concatenate([prompt[: 5 * CHUNK_TOKENS], prompt[:CHUNK_TOKENS] + 1])
            other_keys = chunk_keys(ns.digest(), other, CHUNK_TOKENS)
            t0 = time.perf_counter()
            reply = client.lookup(other_keys)
            print(f"lookup of a prompt sharing 5 chunks: prefix={reply.prefix} "
                  f"tiers={reply.tiers} ({(time.perf_counter() - t0) * 1e6:.0f} µs)")  # fmt: skip

            leases = client.read(other_keys[: reply.prefix])
            for lease, data in zip(leases, payloads, strict=False):
                assert lease is not None
                assert np.array_equal(np.frombuffer(lease.view, dtype=np.uint8), data)
            client.release([x for x in leases if x is not None])
            del lease, leases
            print(f"loaded and verified {reply.prefix} chunks byte for byte")

            assert client.put(b"hello-meshkv-key", b"small payload", num_tokens=3)
            print("put/get:", client.get(b"hello-meshkv-key"))

        with urllib.request.urlopen(f"http://{info['http']}/v1/status", timeout=5) as r:
            print()
            print(render(json.load(r)))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"\nagent stopped (exit code {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
