"""Slot fencing on a real agent: a copy that outlives its reservation or lease can never
land in, or read from, another chunk (the arena is shared with the engines, so the agent
cannot revoke a client's access; it refuses to reuse the slot instead)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from meshkv.client import AgentClient
from meshkv.errors import NotReserved
from meshkv.launch import AgentProcess

CHUNK = 64 << 10
SLOTS = 16


@pytest.fixture
def small_agent(agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> AgentProcess:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        "[store.cpu]\n"
        f"segment_bytes = {CHUNK}\nmin_slot_bytes = {CHUNK}\n"
        'reserve_timeout_s = 0.3\nmax_lease_s = 0.3\neviction = "lru"\n'
    )
    return agent_factory(cpu_bytes=SLOTS * CHUNK, args=["--config", str(cfg)]).start()


def payload(i: int) -> bytes:
    return i.to_bytes(4, "little") * (CHUNK // 4)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_late_write_after_expiry_lands_nowhere(small_agent: AgentProcess) -> None:
    with AgentClient(small_agent.socket_path) as slow, AgentClient(small_agent.socket_path) as busy:
        (late,) = slow.reserve([key(1000)], [CHUNK])
        assert late is not None
        time.sleep(0.6)  # the reservation expires while the "copy" is stalled
        # Another client cycles the whole arena twice over while the slot is voided.
        for i in range(2 * SLOTS):
            assert busy.put(key(i), payload(i))
        late.view[:] = b"\xee" * CHUNK  # the stalled copy resumes
        # Every chunk still in the arena holds exactly its own bytes.
        present = 0
        for i in range(2 * SLOTS):
            got = busy.get(key(i))
            if got is not None:
                present += 1
                assert got == payload(i), f"chunk {i} was overwritten by the late copy"
        assert present >= SLOTS - 2
        assert busy.get(key(1000)) is None
        with pytest.raises(NotReserved, match="expired"):
            slow.commit([key(1000)], [16])  # the late commit is refused
        stats = busy.stats()
        assert stats["reservations_expired"] == 1 and stats["late_commits"] == 1
        assert stats["fenced_slots"] == 0  # the refused commit lifted the fence
        # The slot is usable again.
        for i in range(100, 100 + SLOTS):
            assert busy.put(key(i), payload(i))


def test_overdue_lease_keeps_the_bytes_until_released(small_agent: AgentProcess) -> None:
    with (
        AgentClient(small_agent.socket_path) as reader,
        AgentClient(small_agent.socket_path) as busy,
    ):
        assert busy.put(key(1), payload(1))
        (lease,) = reader.read([key(1)])
        assert lease is not None
        time.sleep(0.6)  # past max_lease_s
        for i in range(10, 10 + 3 * SLOTS):
            busy.put(key(i), payload(i))  # eviction pressure: may fail for full, never reuse
        assert bytes(lease.view) == payload(1)  # the slow reader still sees its chunk
        stats = busy.stats()
        assert stats["leases_overdue"] == 1 and stats["leases_expired"] == 1
        reader.release([lease])
        assert busy.stats()["leases_overdue"] == 0


def test_disconnect_lifts_fences(small_agent: AgentProcess) -> None:
    with AgentClient(small_agent.socket_path) as busy:
        slow = AgentClient(small_agent.socket_path)
        reservations = slow.reserve([key(i) for i in range(4)], [CHUNK] * 4)
        assert all(r is not None for r in reservations)
        time.sleep(0.6)
        busy.put(key(99), payload(99))  # any store call sweeps
        assert busy.stats()["fenced_slots"] == 4
        slow.close()
        deadline = time.monotonic() + 5
        while busy.stats()["fenced_slots"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = busy.stats()
        assert stats["fenced_slots"] == 0
        assert stats["tiers"]["cpu"]["usage_bytes"] == CHUNK  # only key 99 left
