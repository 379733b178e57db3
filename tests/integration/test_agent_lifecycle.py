"""Agent process lifecycle: clean stop, crash + restart on the same SSD, space, two agents."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from meshkv.errors import NoSpace, ProtocolError
from meshkv.launch import AgentProcess
from meshkv.protocol import Op

MiB = 1 << 20

WRITER = r"""
import sys, numpy as np
from meshkv.client import AgentClient
from meshkv.errors import MeshKVError
size = int(sys.argv[3])
with AgentClient(sys.argv[1], timeout=5.0) as c:
    for i in range(int(sys.argv[2])):
        data = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()
        try:
            c.put(b"%016d" % i, data, num_tokens=i)
        except MeshKVError as exc:
            print("stopped at", i, exc, flush=True)
            break
        print(i, flush=True)
"""


def payload(i: int, size: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()


def test_sigterm_is_clean_and_ssd_keeps_chunks(
    agent_factory: Callable[..., AgentProcess], ssd_dir: Path
) -> None:
    agent = agent_factory(ssd_dir=ssd_dir).start()
    size = 256 * 1024
    keys = [b"%016d" % i for i in range(8)]
    with agent.client() as c:
        for i, key in enumerate(keys):
            assert c.put(key, payload(i, size), num_tokens=i)
        assert c.lookup(keys).tiers == ["cpu"] * 8
    arena = agent.arena_name
    assert os.path.exists(f"/dev/shm/{arena}")
    assert stat.S_IMODE(os.stat(agent.socket_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(f"/dev/shm/{arena}").st_mode) == 0o600
    assert agent.stop() == 0
    assert not os.path.exists(agent.socket_path), "socket left behind"
    assert not os.path.exists(f"/dev/shm/{arena}"), "arena left behind"
    assert not agent.ready_file.exists()
    assert "agent stopped" in agent.log()
    # write-back mode: the shutdown flushed the in-memory chunks to SSD
    agent.start()
    with agent.client() as c:
        reply = c.lookup(keys)
        assert reply.prefix == 8 and set(reply.tiers) == {"ssd"}
        for i, key in enumerate(keys):
            assert c.get(key) == payload(i, size)
        assert c.lookup(keys).tiers == ["cpu"] * 8  # promoted by the reads


def test_second_sigterm_while_stopping_still_cleans_up(
    agent_factory: Callable[..., AgentProcess], ssd_dir: Path
) -> None:
    """Operators (and process managers) often signal twice; the arena must not be stranded.

    SIGTERM is sent again and again until the process is gone, so every phase of the
    shutdown (draining, persisting, closing the store, interpreter exit) gets one; each run
    must still end with exit code 0 and nothing left behind."""
    for run in range(3):
        agent = agent_factory(ssd_dir=ssd_dir).start()
        with agent.client() as c:
            for i in range(8):
                assert c.put(b"%015d%d" % (i, run), payload(i, 256 * 1024))
        arena = agent.arena_name
        assert agent.proc is not None
        signals = 0
        deadline = time.monotonic() + 30
        while agent.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                agent.proc.send_signal(signal.SIGTERM)
                signals += 1
            time.sleep(0.001 * (run + 1))
        assert agent.proc.wait(30) == 0, f"exit {agent.proc.returncode} after {signals} SIGTERMs"
        assert signals > 1
        assert not os.path.exists(f"/dev/shm/{arena}"), "arena left behind"
        assert not os.path.exists(agent.socket_path), "socket left behind"
        assert "agent stopped" in agent.log()


def test_lookup_starts_ssd_promotion_and_read_waits(
    agent_factory: Callable[..., AgentProcess], ssd_dir: Path
) -> None:
    agent = agent_factory(ssd_dir=ssd_dir).start()
    keys = [b"%016d" % i for i in range(4)]
    with agent.client() as c:
        for i, key in enumerate(keys):
            c.put(key, payload(i, 128 * 1024))
    agent.restart()  # the CPU tier starts empty; the chunks are on SSD only
    with agent.client() as c:
        assert c.lookup(keys[:2]).tiers == ["ssd"] * 2
        deadline = time.monotonic() + 5
        while c.lookup(keys[:2]).tiers != ["cpu"] * 2:  # the lookup started promotions
            assert time.monotonic() < deadline, "lookup did not promote SSD chunks"
            time.sleep(0.01)
        assert c.lookup(keys).tiers == ["cpu", "cpu", "ssd", "ssd"]
        leases = c.read(keys, wait=2.0)  # waits for the promotions this lookup started
        assert [x is not None for x in leases] == [True] * 4
        for i, lease in enumerate(leases):
            assert lease is not None and bytes(lease.view) == payload(i, 128 * 1024)
        c.release([x for x in leases if x is not None])
    status = agent.get_json("/v1/status")
    assert status["store"]["promotions"] == 4
    assert status["local"]["lookup_hit_chunks"]["ssd"] >= 4


def test_sigkill_during_write_through_writes(
    agent_factory: Callable[..., AgentProcess], ssd_dir: Path
) -> None:
    agent = agent_factory(ssd_dir=ssd_dir, args=["--write-through"]).start()
    size, count = 512 * 1024, 2000
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, agent.socket_path, str(count), str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        for line in writer.stdout:  # the writer is under way...
            if line.strip().isdigit() and int(line) >= 40:
                break
        deadline = time.monotonic() + 30
        while agent.get_json("/v1/status")["store"]["tiers"]["ssd"]["chunks"] < 5:
            assert time.monotonic() < deadline, "no chunk reached the disk"
            time.sleep(0.01)  # ...and some chunks are on disk: crash while it keeps writing
        old_arena = agent.arena_name
        agent.kill()
        out, err = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, err
    assert os.path.exists(f"/dev/shm/{old_arena}")  # a crash leaves the arena behind
    agent.start()
    assert not os.path.exists(f"/dev/shm/{old_arena}"), "stale arena not reclaimed"
    keys = [b"%016d" % i for i in range(count)]
    served = 0
    with agent.client() as c:
        tiers = c.lookup(keys[:1000]).tiers + c.lookup(keys[1000:]).tiers
        assert set(tiers) <= {"ssd", None}
        for i, tier in enumerate(tiers):
            if tier is None:
                continue
            data = c.get(keys[i])
            assert data == payload(i, size), f"chunk {i} is not byte-identical"
            served += 1
    assert served >= 5, "chunks that were on disk before the crash are missing"
    leftovers = [p.name for p in ssd_dir.rglob("*") if p.is_file() and "tmp" in p.name]
    assert leftovers == [], f"partial files survived the restart scan: {leftovers}"


def test_every_slot_pinned_gives_no_space_then_recovers(agent: AgentProcess) -> None:
    size = 4 * MiB
    with agent.client() as c:
        stored = 0
        for i in range(64):  # fill the 64 MiB arena
            try:
                c.put(b"%016d" % i, bytes([i]) * size)
            except NoSpace:
                break
            stored += 1
        assert stored >= 8
        keys = [b"%016d" % i for i in range(stored)]
        present = [k for k, t in zip(keys, c.lookup(keys).tiers, strict=True) if t == "cpu"]
        leases = [x for x in c.read(present) if x is not None]
        pinned = {lease.key for lease in leases}
        with pytest.raises(NoSpace):
            for i in range(stored, stored + 64):  # every slot is pinned: nothing to evict
                c.put(b"%016d" % i, b"n" * size)
        for lease in leases:  # pinned chunks were neither evicted nor overwritten
            i = int(lease.key)
            assert bytes(lease.view[:16]) == bytes([i]) * 16
        c.release(leases)
        assert c.put(b"after-release---", b"r" * size)
        assert c.get(b"after-release---") == b"r" * size
        assert len(pinned) == len(leases)


def test_a_partial_reserve_keeps_the_slots_that_fit(agent: AgentProcess) -> None:
    """With all but two slots pinned, a batch of five: all or nothing (the default) keeps
    none and says ``no_space``; ``partial`` keeps the first two, answers the other three
    unplaced, and the two commit and are read back byte-exact."""
    size = 4 * MiB
    with agent.client() as c:
        for i in range(64):  # more than the 64 MiB arena holds: the oldest are evicted
            c.put(b"%016d" % i, bytes([i]) * size)
        keys = [b"%016d" % i for i in range(64)]
        present = [k for k, t in zip(keys, c.lookup(keys).tiers, strict=True) if t == "cpu"]
        leases = [x for x in c.read(present[2:]) if x is not None]
        assert len(leases) == len(present) - 2 >= 8
        batch = [b"new-%012d" % i for i in range(5)]
        with pytest.raises(NoSpace):
            c.reserve(batch, [size] * 5)
        assert c.lookup(batch).tiers == [None] * 5  # nothing of the batch was kept
        got = c.reserve(batch, [size] * 5, partial=True)
        assert got.unplaced == 3 and got[2:] == [None] * 3
        placed = [r for r in got[:2] if r is not None]
        assert [r.key for r in placed] == batch[:2]
        for r in placed:
            r.view[:] = r.key * (size // 16)
        c.commit(batch[:2], [256, 256])
        assert c.lookup(batch).tiers == ["cpu", "cpu", None, None, None]
        assert c.get(batch[1]) == batch[1] * (size // 16)
        for lease in leases:  # the pinned chunks were not touched
            assert bytes(lease.view[:16]) == bytes([int(lease.key)]) * 16
        c.release(leases)
        assert agent.metric("meshkv_local_reserve_unplaced_chunks_total") == 5 + 3
        with pytest.raises(ProtocolError, match="'partial' must be true or false"):
            c._call(Op.RESERVE, {"keys": batch[:1], "sizes": [size], "partial": 1})
        assert c.lookup(batch[:2]).prefix == 2  # the connection still serves


def test_two_agents_on_one_host(agent_factory: Callable[..., AgentProcess]) -> None:
    a = agent_factory(name="a").start()
    b = agent_factory(name="b").start()
    assert a.arena_name != b.arena_name and a.socket_path != b.socket_path
    assert a.http != b.http
    with a.client() as ca, b.client() as cb:
        assert ca.put(b"x" * 16, b"on a")
        assert cb.get(b"x" * 16) is None
        assert cb.put(b"x" * 16, b"on b")
        assert ca.get(b"x" * 16) == b"on a"
    # a third agent on a's socket is refused and leaves a untouched
    clash = subprocess.run(
        [sys.executable, "-m", "meshkv", "agent", "--socket", a.socket_path, "--http",
         "127.0.0.1:0", "--cpu-bytes", str(64 * MiB)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert clash.returncode != 0
    assert "another agent is already serving" in clash.stderr
    with a.client() as ca:
        assert ca.get(b"x" * 16) == b"on a"


def test_restart_keeps_serving_quickly(agent: AgentProcess) -> None:
    started = time.monotonic()
    agent.stop()
    agent.start()
    assert time.monotonic() - started < 15
    with agent.client() as c:
        c.ping()
