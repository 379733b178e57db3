"""AgentClient against a real agent process: data paths, batching, failures, restarts."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from meshkv.chunk import Namespace, chunk_keys, payload_checksum
from meshkv.client import SHARED_ARENAS, AgentClient
from meshkv.errors import AgentUnavailable, DeadlineExceeded, NotReserved
from meshkv.launch import AgentProcess

WRITER = r"""
import sys, numpy as np
from meshkv.client import AgentClient
with AgentClient(sys.argv[1]) as c:
    for i in range(int(sys.argv[2])):
        key = (b"%016d" % i)
        data = np.random.default_rng(i).integers(0, 256, 4096 + i, dtype=np.uint8).tobytes()
        assert c.put(key, data, num_tokens=i)
print("done")
"""


def payload(i: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, 4096 + i, dtype=np.uint8).tobytes()


def test_put_get_across_two_client_processes(agent: AgentProcess) -> None:
    out = subprocess.run(
        [sys.executable, "-c", WRITER, agent.socket_path, "40"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    reader = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom meshkv.client import AgentClient\n"
            "c = AgentClient(sys.argv[1])\n"
            "print(sum(c.get(b'%016d' % i) is not None for i in range(40)))",
            agent.socket_path,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.strip() == "40"
    with agent.client() as c:
        for i in range(40):
            assert c.get(b"%016d" % i) == payload(i)
        assert c.get(b"%016d" % 99) is None
        assert c.put(b"%016d" % 3, b"other bytes") is False  # already stored


def test_zero_copy_batch_reserve_commit_read_release(agent: AgentProcess) -> None:
    ns = Namespace(model="zero-copy", num_layers=2)
    keys = chunk_keys(ns.digest(), list(range(8 * 16)), 16)
    sizes = [8192 + 512 * i for i in range(len(keys))]
    with agent.client(namespace=ns) as c:
        assert c.lookup(keys).prefix == 0
        reservations = c.reserve(keys, sizes)
        assert all(r is not None for r in reservations)
        for i, r in enumerate(reservations):
            assert r is not None and r.view.nbytes == sizes[i] and not r.view.readonly
            np.frombuffer(r.view, dtype=np.uint8)[:] = i + 1
        c.commit(keys, [16] * len(keys))
        reply = c.lookup(keys)
        assert reply.prefix == len(keys) and reply.tiers == ["cpu"] * len(keys)
        leases = c.read(keys)
        for i, lease in enumerate(leases):
            assert lease is not None and lease.view.readonly and lease.num_tokens == 16
            arr = np.frombuffer(lease.view, dtype=np.uint8)
            assert arr.size == sizes[i] and (arr == i + 1).all()
        c.release([lease for lease in leases if lease is not None])
        # same keys again: every one exists, nothing is reserved
        assert c.reserve(keys, sizes) == [None] * len(keys)
        # abort gives a slot back: the key stays absent
        extra = chunk_keys(ns.digest(), list(range(9 * 16)), 16)[-1]
        (res,) = c.reserve([extra], [4096])
        assert res is not None
        c.abort([extra])
        assert c.lookup([extra]).tiers == [None]
        with pytest.raises(NotReserved):
            c.commit([extra], [16])


def test_namespaces_do_not_share_chunks(agent: AgentProcess) -> None:
    key = b"k" * 16
    with (
        agent.client(namespace=Namespace(model="a")) as a,
        agent.client(namespace=Namespace(model="b")) as b,
    ):
        # Real keys commit to their namespace, so one raw key under two namespaces is a
        # forgery or a bug: it must never be served across them.
        assert a.put(key, b"from a")
        assert b.get(key) is None
        assert b.lookup([key]).prefix == 0
        b.put(key, b"from b")
        assert a.get(key) == b"from a"
        assert b.get(key) in (None, b"from b")
        assert a.hello().namespace != b.hello().namespace


def test_checksum_of_put_is_served(agent: AgentProcess) -> None:
    with agent.client() as c:
        c.put(b"c" * 16, b"payload" * 100)
        (lease,) = c.read([b"c" * 16])
        assert lease is not None
        assert lease.checksum in (None, payload_checksum(b"payload" * 100))
        c.release([lease])


def test_no_agent_raises_unavailable_quickly(tmp_path: object) -> None:
    client = AgentClient("/tmp/meshkv-no-such-dir/agent.sock", timeout=1.0)
    started = time.monotonic()
    with pytest.raises(AgentUnavailable, match="no agent at .*: No such file or directory"):
        client.lookup([b"x" * 16])
    assert time.monotonic() - started < 1.0
    too_long = AgentClient("/tmp/" + "x" * 120, timeout=1.0)
    with pytest.raises(AgentUnavailable, match="AF_UNIX path too long"):  # not ": None"
        too_long.lookup([b"x" * 16])


def test_frozen_agent_hits_the_deadline(agent: AgentProcess) -> None:
    with agent.client(timeout=0.5) as c:
        c.ping()
        agent.sigstop()
        try:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                c.lookup([b"x" * 16])
            assert time.monotonic() - started < 1.5
        finally:
            agent.sigcont()
        assert c.lookup([b"x" * 16]).prefix == 0  # reconnects once it answers again


def test_client_reconnects_after_agent_restart(agent: AgentProcess) -> None:
    with agent.client(timeout=1.0) as c:
        assert c.put(b"r" * 16, b"before restart")
        first_arena = c.hello().arena_name
        agent.stop()
        started = time.monotonic()
        with pytest.raises(AgentUnavailable):
            c.lookup([b"r" * 16])
        assert time.monotonic() - started < 1.0
        agent.start()
        # no SSD tier: the chunk died with the old agent; the new arena is mapped
        assert c.lookup([b"r" * 16]).prefix == 0
        assert c.hello().arena_name != first_arena
        assert c.put(b"r" * 16, b"after restart")
        assert c.get(b"r" * 16) == b"after restart"


def test_a_reserve_after_an_agent_restart_goes_to_the_new_agent(agent: AgentProcess) -> None:
    """A step's saves start with a reserve on a connection the restart broke: it is sent
    again to the new agent (nothing the old one did survives), so an engine does not lose
    the step's saves and open its breaker over an agent upgrade. An op that refers to the
    old agent's state (a commit of its reservations) is not sent again."""
    with agent.client(timeout=1.0) as c:
        assert c.put(b"s" * 16, b"before restart")
        first_arena = c.hello().arena_name
        agent.stop()
        agent.start()
        (slot,) = c.reserve([b"n" * 16], [5])
        assert slot is not None
        assert c.hello().arena_name != first_arena
        slot.view[:5] = b"fresh"
        c.commit([b"n" * 16], [0])
        assert c.get(b"n" * 16) == b"fresh"
        (pending,) = c.reserve([b"p" * 16], [5])
        assert pending is not None
        agent.stop()
        agent.start()
        with pytest.raises(AgentUnavailable):
            c.commit([b"p" * 16], [0])


def test_arena_is_mapped_only_for_data_ops(agent: AgentProcess) -> None:
    def mapped() -> bool:
        with open("/proc/self/maps") as f:
            return agent.arena_name in f.read()

    with agent.client() as c:
        c.lookup([b"q" * 16])  # a scheduler-like client only looks up: no mapping cost
        assert c.connected and not mapped()
        c.map_arena()
        assert mapped()
        c.put(b"q" * 16, b"data")
    assert not mapped()  # closing the client unmaps it


def test_clients_of_one_process_share_one_mapping_of_the_arena(agent: AgentProcess) -> None:
    """An engine worker has a client per load lane and one for saves: they map the arena
    once between them (each mapped it whole before, populating its page tables, inside
    its first call's deadline), and the last one to go unmaps it."""

    def mappings() -> int:
        with open("/proc/self/maps") as f:
            return sum(agent.arena_name in line for line in f)

    with agent.client() as a, agent.client() as b:
        a.map_arena()
        regions = mappings()
        b.map_arena()
        assert mappings() == regions > 0  # no second mapping
        assert SHARED_ARENAS.users(agent.arena_name) == 2
        assert a.put(b"m" * 16, b"from a")
        assert b.get(b"m" * 16) == b"from a"
        a.close()
        assert SHARED_ARENAS.users(agent.arena_name) == 1
        assert b.put(b"n" * 16, b"b still maps it") and b.get(b"n" * 16) == b"b still maps it"
    assert SHARED_ARENAS.users(agent.arena_name) == 0 and mappings() == 0


def test_one_client_shared_by_threads(agent: AgentProcess) -> None:
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(50):
                key = b"t%d-%013d" % (t, i)
                data = bytes([t]) * (1000 + i)
                c.put(key, data)
                assert c.get(key) == data
                assert c.lookup([key]).prefix == 1
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    with agent.client() as c:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert errors == []
        assert c.stats()["tiers"]["cpu"]["chunks"] == 200
