"""``python -m meshkv.demo`` (``make demo``): a live agent, chunks through the client, status.

Starts a real ``meshkv agent`` process on a private socket with a small CPU tier and an
SSD directory, stores the chunks of a fake prompt through ``AgentClient`` (zero-copy:
reserve, copy into the arena, commit), looks up a second prompt that shares a prefix,
loads the shared chunks back and checks them byte for byte, prints the agent's status,
and shuts the agent down with SIGTERM. Then three agents form a mesh (gossip, one ring),
a prompt stored on one is pulled by another through the key's home, and the ring's status
is printed. Later this grows into the mesh + vLLM demo.
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
    return mesh_demo()


# --- the mesh: three agents become one cache ---------------------------------------------


def start_mesh_agent(
    workdir: Path, name: str, secret: Path, join: str | None
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start one agent of the demo mesh; returns the process and its ready-file info."""
    ready = workdir / f"{name}.json"
    cmd = [
        sys.executable, "-m", "meshkv", "agent", "--node-id", name,
        "--socket", str(workdir / f"{name}.sock"), "--http", "127.0.0.1:0",
        "--ready-file", str(ready), "--cpu-gb", "0.25", "--log-level", "warning",
        "--listen", "127.0.0.1:0", "--mesh-secret-file", str(secret), "--mesh-preset", "local",
    ]  # fmt: skip
    if join:
        cmd += ["--join", join]
    print("$", " ".join(cmd[2:]))
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"agent {name} exited with {proc.returncode}")
        try:
            info: dict[str, Any] = json.loads(ready.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.05)
            continue
        return proc, info
    proc.kill()
    raise SystemExit(f"agent {name} did not become ready within 30 s")


def _get_json(http: str, path: str) -> Any:
    with urllib.request.urlopen(f"http://{http}{path}", timeout=5) as r:
        return json.load(r)


def mesh_demo() -> int:
    """Three agents find each other, agree on one ring, and serve each other's chunks."""
    import os

    from meshkv.cli.ring_cmd import render_status

    print("\n=== the mesh: three agents, one cache ===")
    workdir = Path(tempfile.mkdtemp(prefix="meshkv-mesh-demo-", dir="/tmp"))
    secret = workdir / "mesh.secret"
    secret.write_text(os.urandom(24).hex())
    procs: list[subprocess.Popen[bytes]] = []
    try:
        proc, a = start_mesh_agent(workdir, "node-a", secret, None)
        procs.append(proc)
        seed = _get_json(a["http"], "/v1/status")["mesh"]["address"]
        infos = [a]
        for name in ("node-b", "node-c"):
            proc, info = start_mesh_agent(workdir, name, secret, seed)
            procs.append(proc)
            infos.append(info)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            views = [_get_json(i["http"], "/v1/ring?stats=0") for i in infos]
            if (
                all(sum(m["state"] == "alive" for m in v["members"]) == 3 for v in views)
                and len({v["ring"]["digest"] for v in views}) == 1
            ):
                break
            time.sleep(0.1)
        else:
            raise SystemExit("the agents did not converge within 20 s")
        print(f"converged: 3 members, ring digest {views[0]['ring']['digest']}")

        ns = Namespace(model="demo-model", num_layers=8, kv_heads=4, head_size=64)
        rng = np.random.default_rng(1)
        prompt = rng.integers(0, 32000, 6 * CHUNK_TOKENS)
        keys = chunk_keys(ns.digest(), prompt, CHUNK_TOKENS)
        payloads = [rng.integers(0, 256, CHUNK_BYTES, dtype=np.uint8).tobytes() for _ in keys]
        with AgentClient(a["socket"], namespace=ns) as ca:
            for key, data in zip(keys, payloads, strict=True):
                ca.put(key, data, num_tokens=CHUNK_TOKENS)
        print(f"node-a stored {len(keys)} chunks of a prompt")
        c = infos[2]
        with AgentClient(c["socket"], namespace=ns) as cc:
            deadline = time.monotonic() + 10
            reply = cc.lookup(keys)
            while reply.prefix < len(keys) and time.monotonic() < deadline:
                time.sleep(0.05)  # the holder's announcements are batched (50 ms)
                reply = cc.lookup(keys)
            print(f"node-c lookup: prefix={reply.prefix} tiers={reply.tiers}")
            t0 = time.perf_counter()
            leases = cc.read(keys, wait=10.0)
            ok = all(
                x is not None and bytes(x.view) == d for x, d in zip(leases, payloads, strict=True)
            )
            print(f"node-c pulled and verified {sum(x is not None for x in leases)} chunks from "
                  f"node-a in {(time.perf_counter() - t0) * 1e3:.0f} ms: "
                  f"{'identical' if ok else 'MISMATCH'}")  # fmt: skip
            cc.release([x for x in leases if x is not None])
            del leases
        print()
        print(render_status(_get_json(c["http"], "/v1/ring")))
        return 0 if ok else 1
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
        print("\nmesh agents stopped (graceful leave)")


if __name__ == "__main__":
    sys.exit(main())
