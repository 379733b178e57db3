"""Shared-memory arena: unique names, cross-process mapping, clean unlink, crash reclaim."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshkv.errors import ConfigError
from meshkv.tiers.arena import SHM_DIR, Arena, owner_alive, reclaim_stale

SIZE = 1 << 20


def test_two_arenas_in_one_process_do_not_collide() -> None:
    with Arena.create(SIZE) as a, Arena.create(SIZE) as b:
        assert a.name != b.name
        assert str(os.getpid()) in a.name
        a.buffer[:4] = b"aaaa"
        b.buffer[:4] = b"bbbb"
        assert bytes(a.buffer[:4]) == b"aaaa"
        assert bytes(b.buffer[:4]) == b"bbbb"
        assert owner_alive(a.name)
    assert not os.path.exists(os.path.join(SHM_DIR, a.name))
    assert not os.path.exists(os.path.join(SHM_DIR, b.name))


def test_other_process_maps_by_name_read_write() -> None:
    with Arena.create(SIZE) as arena:
        arena.buffer[100:105] = b"hello"
        code = textwrap.dedent(
            f"""
            from meshkv.tiers.arena import Arena
            a = Arena.attach({arena.name!r})
            assert bytes(a.view(100, 5)) == b"hello"
            a.view(200, 5)[:] = b"world"
            a.close()
            """
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
        assert bytes(arena.view(200, 5)) == b"world"
        # a client closing its mapping must not unlink the owner's arena
        assert os.path.exists(os.path.join(SHM_DIR, arena.name))


def test_stale_arena_of_dead_pid_is_reclaimed() -> None:
    code = textwrap.dedent(
        """
        import sys, time
        from meshkv.tiers.arena import Arena
        a = Arena.create(1 << 20)
        print(a.name, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        name = proc.stdout.readline().strip()
        path = os.path.join(SHM_DIR, name)
        assert os.path.exists(path)
        assert name not in reclaim_stale()  # owner alive: kept
        assert os.path.exists(path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert os.path.exists(path)  # SIGKILL leaves it behind...
    assert name in reclaim_stale()  # ...and the next start removes it
    assert not os.path.exists(path)


def test_bad_sizes_and_names_are_rejected() -> None:
    with pytest.raises(ConfigError, match="multiple"):
        Arena.create(1000)
    with pytest.raises(ConfigError, match="not a meshkv arena"):
        Arena.attach("../etc/passwd")


def test_prefault_leaves_zeroed_writable_pages() -> None:
    with Arena.create(SIZE, prefault=True) as arena:
        assert bytes(arena.view(SIZE - 8, 8)) == bytes(8)
        with pytest.raises(ValueError, match="outside arena"):
            arena.view(SIZE - 4, 8)


def test_locked_arena_is_kept_even_if_its_pid_looks_dead() -> None:
    """A live owner in another pid namespace: its name's pid means nothing here."""
    with Arena.create(SIZE) as arena:
        fake = "meshkv-999999999-1-" + "ab" * 8
        os.link(os.path.join(SHM_DIR, arena.name), os.path.join(SHM_DIR, fake))
        try:
            assert not owner_alive(fake)
            assert fake not in reclaim_stale()  # the owner's flock is held
            assert os.path.exists(os.path.join(SHM_DIR, fake))
        finally:
            os.unlink(os.path.join(SHM_DIR, fake))


def test_reclaim_skips_what_is_not_its_own_arena_file(tmp_path: Path) -> None:
    """``/dev/shm`` is writable by every user: a FIFO under a dead agent's arena name used
    to hang the next agent's start (a blocking open), and another user's file (mode 0600)
    to stop it (PermissionError for a non-root agent). Only this user's regular files are
    reclaimed; the rest is left alone."""
    dead = "meshkv-999999999-1-"
    stale = tmp_path / (dead + "aa" * 8)
    stale.write_bytes(b"\0" * 4096)
    fifo = tmp_path / (dead + "bb" * 8)
    os.mkfifo(fifo)
    foreign = tmp_path / (dead + "cc" * 8)
    foreign.write_bytes(b"\0" * 4096)
    foreign.chmod(0o600)
    os.chown(foreign, 12345, 12345)  # the tests run as root (as CI does)
    link = tmp_path / (dead + "dd" * 8)
    link.symlink_to(stale)
    assert reclaim_stale(str(tmp_path)) == [stale.name]
    assert fifo.exists() and foreign.exists() and link.is_symlink()
