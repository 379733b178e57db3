"""The shared Redis tier (``--remote``) against a real ``redis-server``: write-behind, read
on miss, verification, TTL, the byte cap, overload, an unreachable server, TLS and a
password."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshkv.chunk import RECORD_HEADER_BYTES, RecordHeader
from meshkv.client import DEFAULT_NAMESPACE
from meshkv.launch import (
    AgentProcess,
    LaunchError,
    RedisProcess,
    free_port,
    make_test_ca,
    mesh_args,
    write_secret,
)
from tests.helpers.mesh import metric, peer_address, read_verified, wait_converged, wait_for

MiB = 1 << 20


@pytest.fixture
def redis_server() -> Iterator[Callable[..., RedisProcess]]:
    made: list[RedisProcess] = []

    def make(**kwargs: object) -> RedisProcess:
        server = RedisProcess(**kwargs)  # type: ignore[arg-type]
        made.append(server)
        return server

    yield make
    for server in made:
        server.cleanup()


def _put(agent: AgentProcess, payloads: dict[bytes, bytes]) -> None:
    with agent.client() as c:
        for key, data in payloads.items():
            assert c.put(key, data, num_tokens=256)


def _written(agent: AgentProcess, n: int) -> None:
    wait_for(
        f"{n} write-behind copies",
        lambda: metric(agent, "meshkv_remote_writes_total") >= n,
        timeout=20.0,
    )


def _wait_until_copied(agent: AgentProcess, redis: RedisProcess) -> None:
    """Store new chunks until one reaches the server (one stored while the tier is backed
    off is dropped, so each try stores another), then the tier must report itself up."""
    r = redis.client()
    tried: list[bytes] = []

    def copied() -> bool:
        tried.append(os.urandom(16))
        _put(agent, {tried[-1]: os.urandom(64 << 10)})
        return any(r.exists(_value_name(k)) for k in tried)

    wait_for("a chunk to reach the server", copied, timeout=45.0)
    assert metric(agent, "meshkv_remote_up") == 1


def _value_name(key: bytes) -> str:
    return f"meshkv:c:{DEFAULT_NAMESPACE.digest().hex()}:{key.hex()}"


def test_chunks_written_behind_are_read_on_another_node(
    agent_factory: Callable[..., AgentProcess], redis_server: Callable[..., RedisProcess]
) -> None:
    redis = redis_server().start()
    a = agent_factory(name="a", args=["--remote", redis.url, "--remote-ttl", "600"]).start()
    b = agent_factory(name="b", args=["--remote", redis.url]).start()
    payloads = {os.urandom(16): os.urandom(MiB) for _ in range(4)}
    _put(a, payloads)
    _written(a, 4)
    keys = list(payloads)
    r = redis.client()
    for key, data in payloads.items():
        value = r.get(_value_name(key))
        header = RecordHeader.unpack(value[:RECORD_HEADER_BYTES])
        header.verify(value[RECORD_HEADER_BYTES:], DEFAULT_NAMESPACE.digest())
        assert header.key == key and header.num_tokens == 256
        assert value[RECORD_HEADER_BYTES:] == data
        assert 0 < r.pttl(_value_name(key)) <= 600_000
    assert int(r.get("meshkv:bytes")) == sum(
        RECORD_HEADER_BYTES + len(v) for v in payloads.values()
    )

    with b.client() as cb:
        assert cb.lookup(keys).tiers == ["remote"] * 4
        read_verified(b, cb, payloads, wait=5.0)
        assert cb.lookup(keys).tiers == ["cpu"] * 4
    assert metric(b, "meshkv_remote_reads_total") == 4
    assert metric(b, "meshkv_remote_read_bytes_total") == sum(len(v) for v in payloads.values())
    assert metric(b, "meshkv_lookup_hit_chunks_total", 'tier="remote"') == 4
    # what B fetched is not written back; what an engine stores on B is
    assert metric(b, "meshkv_remote_writes_total") == 0
    status = b.get_json("/v1/status")["remote"]
    assert status["up"] is True and status["url"] == redis.url
    # a key nobody stored is a plain miss
    with b.client() as cb:
        assert cb.lookup([os.urandom(16)]).prefix == 0
    # a third node computing the same chunks renews them and stores nothing twice
    c = agent_factory(name="c", args=["--remote", redis.url]).start()
    _put(c, payloads)
    wait_for("renewals", lambda: metric(c, "meshkv_remote_refreshed_total") == 4)
    assert metric(c, "meshkv_remote_writes_total") == 0
    assert int(r.get("meshkv:bytes")) == sum(
        RECORD_HEADER_BYTES + len(v) for v in payloads.values()
    )
    assert r.keys("meshkv:tmp:*") == []  # every temporary name was renamed or deleted


def test_a_damaged_value_is_never_served(
    agent_factory: Callable[..., AgentProcess], redis_server: Callable[..., RedisProcess]
) -> None:
    redis = redis_server().start()
    a = agent_factory(name="a", args=["--remote", redis.url]).start()
    b = agent_factory(name="b", args=["--remote", redis.url]).start()
    payloads = {os.urandom(16): os.urandom(MiB) for _ in range(3)}
    _put(a, payloads)
    _written(a, 3)
    flipped, moved, cut = list(payloads)
    r = redis.client()
    # a flipped payload byte, another chunk's record under this key, a truncated value
    name = _value_name(flipped)
    at = RECORD_HEADER_BYTES + 1000
    r.setrange(name, at, bytes([r.getrange(name, at, at)[0] ^ 0x10]))
    r.set(_value_name(moved), r.get(_value_name(cut)))
    r.set(_value_name(cut), r.get(_value_name(cut))[: RECORD_HEADER_BYTES + 100])
    with b.client() as cb:
        for key in payloads:
            assert cb.lookup([key]).tiers == ["remote"]  # present; not yet verified
            (lease,) = cb.read([key], wait=5.0)
            assert lease is None, f"a damaged value was served for {key.hex()}"
            assert cb.lookup([key]).prefix == 0  # deleted from the server: a clean miss
    assert metric(b, "meshkv_remote_corrupt_total") == 3
    assert metric(b, "meshkv_remote_reads_total") == 0
    assert not any(r.exists(_value_name(k)) for k in payloads)
    assert b.running


def test_byte_cap_and_ttl(
    agent_factory: Callable[..., AgentProcess], redis_server: Callable[..., RedisProcess]
) -> None:
    redis = redis_server().start()
    cap = 3 * MiB + 3 * RECORD_HEADER_BYTES + 1000  # room for three 1 MiB chunks
    a = agent_factory(
        name="a",
        args=["--remote", redis.url, "--remote-gb", str(cap / (1 << 30)), "--remote-ttl", "2"],
    ).start()
    payloads = {os.urandom(16): os.urandom(MiB) for _ in range(6)}
    keys = list(payloads)
    for i, key in enumerate(keys):  # one at a time: the order of writes is the order of age
        _put(a, {key: payloads[key]})
        _written(a, i + 1)
    r = redis.client()
    present = [bool(r.exists(_value_name(k))) for k in keys]
    assert present == [False, False, False, True, True, True]
    assert metric(a, "meshkv_remote_evicted_total") == 3
    stored = sum(r.strlen(_value_name(k)) for k in keys)
    assert int(r.get("meshkv:bytes")) == stored <= cap
    assert r.zcard("meshkv:index") == 3
    # the TTL: every value is gone 2 s after its last write or read
    assert all(0 < r.pttl(_value_name(k)) <= 2000 for k in keys[3:])
    wait_for("values to expire", lambda: not any(r.exists(_value_name(k)) for k in keys))
    # the next write forgets the expired values in the accounting
    _put(a, {os.urandom(16): os.urandom(MiB)})
    _written(a, 7)
    assert r.zcard("meshkv:index") == 1
    assert int(r.get("meshkv:bytes")) == MiB + RECORD_HEADER_BYTES


def test_a_frozen_server_never_blocks_the_engine(
    agent_factory: Callable[..., AgentProcess], redis_server: Callable[..., RedisProcess]
) -> None:
    redis = redis_server().start()
    a = agent_factory(
        name="a", cpu_bytes=128 * MiB, args=["--remote", redis.url, "--remote-queue-mb", "4"]
    ).start()
    redis.sigstop()  # accepts connections (the kernel does), answers nothing
    try:
        payloads = {os.urandom(16): os.urandom(MiB) for _ in range(24)}
        started = time.monotonic()
        _put(a, payloads)
        with a.client() as ca:
            missing = [os.urandom(16) for _ in range(8)]
            for key in missing:  # lookups still answer (the remote part is cut off)
                assert ca.lookup([key]).prefix == 0
            assert ca.lookup(list(payloads)).tiers == ["cpu"] * 24
        elapsed = time.monotonic() - started
        dropped = metric(a, "meshkv_remote_dropped_total", 'reason="queue_full"')
        dropped += metric(a, "meshkv_remote_dropped_total", 'reason="unavailable"')
        assert dropped >= 24 - 4 - 2, a.log()[-3000:]  # the queue holds 4 MiB, 2 in writers
        # the lookups were cut off by their budget, then skipped while backed off
        assert elapsed < 10, f"puts and lookups took {elapsed:.1f} s with the server frozen"
    finally:
        redis.sigcont()
    # the server answers again: after its back-off (at most 30 s) the agent uses it
    _wait_until_copied(a, redis)


def test_an_unreachable_server_at_start_is_used_once_it_comes_up(
    agent_factory: Callable[..., AgentProcess], redis_server: Callable[..., RedisProcess]
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    a = agent_factory(name="a", args=["--remote", url]).start()  # nothing listens yet
    payload = {os.urandom(16): os.urandom(MiB)}
    _put(a, payload)
    with a.client() as ca:
        assert ca.lookup([os.urandom(16)]).prefix == 0
    assert metric(a, "meshkv_remote_errors_total", 'kind="connection"') >= 1
    assert metric(a, "meshkv_remote_dropped_total", 'reason="unavailable"') >= 1
    assert metric(a, "meshkv_remote_up") == 0
    _wait_until_copied(a, redis_server(port=port).start())


def test_tls_and_password(
    agent_factory: Callable[..., AgentProcess],
    redis_server: Callable[..., RedisProcess],
    tmp_path: Path,
) -> None:
    tls = make_test_ca(tmp_path / "tls")
    password = "s3cret-" + os.urandom(8).hex()
    redis = redis_server(password=password, tls_dir=tls).start()
    secret = tmp_path / "redis.pass"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    remote = ["--remote", redis.url, "--remote-tls-ca", str(tls / "ca.crt")]
    a = agent_factory(name="a", args=[*remote, "--remote-password-file", str(secret)]).start()
    payloads = {os.urandom(16): os.urandom(MiB)}
    _put(a, payloads)
    _written(a, 1)
    assert redis.client().exists(_value_name(next(iter(payloads))))

    wrong = tmp_path / "wrong.pass"
    wrong.write_text("not-the-password")
    wrong.chmod(0o600)
    refused = agent_factory(name="w", args=[*remote, "--remote-password-file", str(wrong)])
    with pytest.raises(LaunchError, match="refused the credentials"):
        refused.start()
    # without the CA, the server's certificate is not trusted: no chunk goes there
    untrusted = agent_factory(
        name="u", args=["--remote", redis.url, "--remote-password-file", str(secret)]
    ).start()
    _put(untrusted, {os.urandom(16): os.urandom(4096)})
    wait_for(
        "the failed TLS handshake to be counted",
        lambda: metric(untrusted, "meshkv_remote_errors_total") >= 1,
    )
    assert metric(untrusted, "meshkv_remote_writes_total") == 0


def test_in_a_mesh_peers_come_first_and_the_remote_tier_outlives_a_dead_holder(
    agent_factory: Callable[..., AgentProcess],
    redis_server: Callable[..., RedisProcess],
    tmp_path: Path,
) -> None:
    redis = redis_server().start()
    secret = write_secret(tmp_path)
    remote = ["--remote", redis.url]
    a = agent_factory(name="a", args=[*mesh_args(secret), *remote]).start()
    b = agent_factory(name="b", args=[*mesh_args(secret, join=[peer_address(a)]), *remote])
    b.start()
    wait_converged([a, b])

    def stored_on_a(n: int) -> dict[bytes, bytes]:
        payloads = {os.urandom(16): os.urandom(MiB) for _ in range(n)}
        before = metric(a, "meshkv_remote_writes_total")
        _put(a, payloads)
        _written(a, int(before) + n)
        wait_for(
            "the homes to know the holder",
            lambda: sum(metric(x, "meshkv_mesh_directory_keys") for x in (a, b)) >= before + n,
        )
        return payloads

    def read_on_b(payloads: dict[bytes, bytes]) -> list[str | None]:
        keys = list(payloads)
        with b.client() as cb:
            tiers = cb.lookup(keys).tiers
            read_verified(b, cb, payloads, wait=10.0)
        return tiers

    # both hold it: the peer is asked first (one hop, no shared server in the way)
    assert read_on_b(stored_on_a(2)) == ["peer", "peer"]
    assert metric(b, "meshkv_peer_pulls_total") == 2
    assert metric(b, "meshkv_remote_reads_total") == 0
    # the holder dies: whatever B's failure detector knows yet, the bytes come from Redis
    later = stored_on_a(2)
    a.kill()
    assert set(read_on_b(later)) <= {"peer", "remote"}
    assert metric(b, "meshkv_remote_reads_total") == 2


def test_a_clean_stop_drains_the_write_behind_queue(
    agent_factory: Callable[..., AgentProcess], redis_server: Callable[..., RedisProcess]
) -> None:
    redis = redis_server().start()
    a = agent_factory(name="a", cpu_bytes=128 * MiB, args=["--remote", redis.url]).start()
    payloads = {os.urandom(16): os.urandom(MiB) for _ in range(16)}
    _put(a, payloads)
    assert a.stop() == 0  # SIGTERM right after the last commit
    r = redis.client()
    assert all(r.exists(_value_name(k)) for k in payloads), a.log()[-2000:]
