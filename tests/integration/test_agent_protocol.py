"""Bad input on the local channel: clear errors, and the agent keeps serving others."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from meshkv.client import AgentClient
from meshkv.errors import ConfigError, NotPinned, NotReserved, ProtocolError, StoreError
from meshkv.launch import AgentProcess
from meshkv.protocol import MAX_FRAME_BYTES, MAX_KEYS_PER_REQUEST, PROTOCOL_MAX_VERSION

HELLO = {"op": "hello", "id": 1, "min_version": 1, "max_version": 1, "namespace": {"model": "t"}}


_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_raw_sockets() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


class Raw:
    """A hand-driven local-channel connection (to send what no client would)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _OPEN.append(self.sock)
        self.sock.settimeout(5)
        self.sock.connect(path)

    def send_body(self, body: bytes) -> None:
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def send(self, message: Any) -> None:
        self.send_body(msgpack.packb(message, use_bin_type=True))

    def recv(self) -> dict[str, Any]:
        head = self._exact(4)
        (size,) = struct.unpack(">I", head)
        reply: dict[str, Any] = msgpack.unpackb(self._exact(size))
        return reply

    def call(self, message: Any) -> dict[str, Any]:
        self.send(message)
        return self.recv()

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("agent closed the connection")
            buf += chunk
        return buf


@pytest.fixture
def raw(agent: AgentProcess) -> Raw:
    conn = Raw(agent.socket_path)
    assert conn.call(HELLO)["version"] == 1
    return conn


def still_serving(agent: AgentProcess) -> None:
    with AgentClient(agent.socket_path) as c:
        assert c.put(b"s" * 16, b"alive") in (True, False)
        assert c.get(b"s" * 16) == b"alive"


def error_of(reply: dict[str, Any]) -> tuple[str, str]:
    err = reply["error"]
    return err["code"], err["message"]


def test_malformed_request_keeps_connection(agent: AgentProcess, raw: Raw) -> None:
    assert error_of(raw.call([1, 2, 3]))[0] == "protocol"  # not a map
    code, message = error_of(raw.call({"op": "lookup"}))  # no id
    assert code == "protocol" and "id" in message
    code, message = error_of(raw.call({"op": "lookup", "id": 5, "keys": "nope"}))
    assert code == "protocol" and "keys" in message
    assert raw.call({"op": "ping", "id": 6}) == {"id": 6}  # same connection still works
    still_serving(agent)


def test_read_verify_flag_must_be_a_bool(agent: AgentProcess, raw: Raw) -> None:
    reply = raw.call({"op": "read", "id": 11, "keys": [b"k" * 16], "verify": "yes"})
    code, message = error_of(reply)
    assert code == "protocol" and "'verify' must be true or false" in message
    assert raw.call({"op": "read", "id": 12, "keys": [b"k" * 16], "verify": True}) == {
        "id": 12,
        "leases": [None],
    }
    still_serving(agent)


def test_read_budget_must_be_a_positive_number(agent: AgentProcess, raw: Raw) -> None:
    for bad in (0, -1, "1", True, [1]):
        reply = raw.call({"op": "read", "id": 15, "keys": [b"k" * 16], "budget": bad})
        code, message = error_of(reply)
        assert code == "protocol" and "'budget' must be a positive number" in message
    reply = raw.call({"op": "read", "id": 16, "keys": [b"k" * 16], "wait": 0.1, "budget": 0.5})
    assert reply == {"id": 16, "leases": [None]}
    still_serving(agent)


def test_lookup_probe_flag_must_be_a_bool(agent: AgentProcess, raw: Raw) -> None:
    reply = raw.call({"op": "lookup", "id": 13, "keys": [b"k" * 16], "probe": 1})
    code, message = error_of(reply)
    assert code == "protocol" and "'probe' must be true or false" in message
    reply = raw.call({"op": "lookup", "id": 14, "keys": [b"k" * 16], "probe": True})
    assert reply == {"id": 14, "prefix": 0, "tiers": [None]}
    still_serving(agent)


def test_unknown_op(agent: AgentProcess, raw: Raw) -> None:
    reply = raw.call({"op": "frobnicate", "id": 2})
    code, message = error_of(reply)
    assert reply["id"] == 2 and code == "protocol" and "unknown op 'frobnicate'" in message
    assert raw.call({"op": "ping", "id": 3}) == {"id": 3}


def test_op_before_hello(agent: AgentProcess) -> None:
    conn = Raw(agent.socket_path)
    code, message = error_of(conn.call({"op": "lookup", "id": 1, "keys": []}))
    assert code == "protocol" and "hello first" in message


def test_undecodable_frame_closes_only_that_connection(agent: AgentProcess, raw: Raw) -> None:
    other = Raw(agent.socket_path)
    assert other.call(HELLO)["version"] == 1
    raw.send_body(b"\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
    code, message = error_of(raw.recv())
    assert code == "protocol" and "undecodable" in message
    assert raw.closed_by_peer()
    assert other.call({"op": "ping", "id": 9}) == {"id": 9}
    still_serving(agent)


def test_truncated_frame(agent: AgentProcess, raw: Raw) -> None:
    raw.sock.sendall(struct.pack(">I", 100) + b"\x80" * 10)  # 10 of 100 bytes, then EOF
    raw.sock.shutdown(socket.SHUT_WR)
    code, message = error_of(raw.recv())
    assert code == "protocol" and "truncated frame" in message
    # a body cut short inside its msgpack encoding is undecodable, same clear error
    conn = Raw(agent.socket_path)
    body = msgpack.packb(HELLO, use_bin_type=True)
    conn.send_body(body[: len(body) // 2])
    code, message = error_of(conn.recv())
    assert code == "protocol" and "undecodable" in message
    still_serving(agent)


def test_oversized_frame_closes_connection(agent: AgentProcess, raw: Raw) -> None:
    raw.sock.sendall(struct.pack(">I", MAX_FRAME_BYTES + 1))
    code, message = error_of(raw.recv())
    assert code == "protocol" and "exceeds" in message and str(MAX_FRAME_BYTES) in message
    assert raw.closed_by_peer()
    still_serving(agent)


def test_too_many_keys(agent: AgentProcess, raw: Raw) -> None:
    keys = [b"k" * 16] * (MAX_KEYS_PER_REQUEST + 1)
    code, message = error_of(raw.call({"op": "lookup", "id": 4, "keys": keys}))
    assert code == "protocol" and str(MAX_KEYS_PER_REQUEST) in message


def test_wrong_protocol_version(agent: AgentProcess) -> None:
    conn = Raw(agent.socket_path)
    hello = dict(HELLO, min_version=PROTOCOL_MAX_VERSION + 1, max_version=PROTOCOL_MAX_VERSION + 5)
    code, message = error_of(conn.call(hello))
    assert code == "version" and "agent speaks" in message
    assert conn.closed_by_peer()
    still_serving(agent)


def test_key_of_wrong_length(agent: AgentProcess, raw: Raw) -> None:
    reply = raw.call({"op": "lookup", "id": 7, "keys": [b"k" * 16, b"short"]})
    code, message = error_of(reply)
    assert code == "protocol" and "key 1 is 5 bytes" in message
    reply = raw.call({"op": "reserve", "id": 8, "keys": [b"k" * 17], "sizes": [10]})
    assert "key 0 is 17 bytes" in error_of(reply)[1]
    assert raw.call({"op": "ping", "id": 9}) == {"id": 9}


def test_commit_of_never_reserved_key(agent: AgentProcess) -> None:
    with AgentClient(agent.socket_path) as c:
        with pytest.raises(NotReserved, match="1 of 1 keys not committed.*key 0"):
            c.commit([b"n" * 16], [0])
        c.ping()


def test_double_release(agent: AgentProcess) -> None:
    with AgentClient(agent.socket_path) as c:
        c.put(b"d" * 16, b"data")
        (lease,) = c.read([b"d" * 16])
        assert lease is not None
        c.release([lease])
        with pytest.raises(NotPinned):
            c.release([lease])
        assert c.get(b"d" * 16) == b"data"


def test_bad_namespace_and_sizes(agent: AgentProcess) -> None:
    conn = Raw(agent.socket_path)
    code, message = error_of(conn.call(dict(HELLO, namespace={"model": "m", "num_layers": 0})))
    assert code == "config" and "num_layers" in message
    code, message = error_of(conn.call(dict(HELLO, namespace={"modle": "m"})))
    assert code == "config" and "modle" in message
    assert conn.call(HELLO)["version"] == 1
    reply = conn.call({"op": "reserve", "id": 3, "keys": [b"k" * 16], "sizes": [-1]})
    assert "sizes[0]" in error_of(reply)[1]


def test_client_side_key_validation(agent: AgentProcess) -> None:
    with AgentClient(agent.socket_path) as c, pytest.raises(ValueError, match="16 bytes"):
        c.lookup([b"short"])
    with pytest.raises(ProtocolError):
        raise ProtocolError("codes map to classes")  # sanity: the class is importable


def test_chunk_geometry_at_hello(agent: AgentProcess) -> None:
    with AgentClient(agent.socket_path, chunk_tokens=256, chunk_bytes=2 << 20) as c:
        assert c.hello().max_chunk_bytes >= 2 << 20
    big = AgentClient(agent.socket_path, chunk_bytes=1 << 40)
    with pytest.raises(ConfigError, match="exceed this agent's largest slot"):
        big.hello()
    big.close()


def test_chunk_larger_than_any_slot(agent: AgentProcess) -> None:
    with AgentClient(agent.socket_path) as c:
        with pytest.raises(StoreError, match="exceeds the largest slot"):
            c.reserve([b"b" * 16], [1 << 30])
        assert c.put(b"b" * 16, b"fits")


STRANGER = """
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
body = bytes.fromhex(sys.argv[2])
try:
    s.sendall(struct.pack(">I", len(body)) + body)
    print("closed" if s.recv(4) == b"" else "answered")
except ConnectionError:
    print("closed")
"""


def test_a_client_of_another_user_is_refused(agent: AgentProcess) -> None:
    """The socket is 0600 in a private directory; loosened by hand (here: 0666 and a
    traversable directory), a process of another user can reach it, and the agent's
    SO_PEERCRED check refuses it before it reads a byte: the arena is this user's."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    os.chmod(agent.socket_path, 0o666)
    os.chmod(os.path.dirname(agent.socket_path), 0o755)
    hello = msgpack.packb(HELLO, use_bin_type=True).hex()
    out = subprocess.run(
        ["/usr/bin/python3", "-c", STRANGER, agent.socket_path, hello],
        capture_output=True, text=True, timeout=30, user=65534, group=65534,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "closed", out.stdout
    assert agent.metric("meshkv_local_refused_connections_total") == 1
    assert "refused a local connection: pid" in agent.log()
    assert "runs as uid 65534" in agent.log()
    still_serving(agent)  # the agent's own user is served as before


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"renew": "node-p/x1", "renew_s": 30}, "'renew' must be a list"),
        ({"renew": [["node-p"]], "renew_s": 30}, r"'renew'\[0\] must be a \[producer"),
        ({"renew": [["node-p", 5]], "renew_s": 30}, "the transfer id must be a string"),
        ({"abandon": [["", "x1"]]}, "the producer must be a node id"),
        ({"renew": [["node-p", "x1"]]}, "'renew_s' must be in"),
        ({"renew": [["node-p", "x1"]], "renew_s": 601}, "'renew_s' must be in"),
        ({"renew": [["node-p", "x1"]], "renew_s": "30"}, "'renew_s' must be a number"),
    ],
)
def test_transfers_op_rejects_bad_fields(
    agent: AgentProcess, raw: Raw, fields: dict[str, Any], message: str
) -> None:
    """The ``transfers`` op (local protocol 2): a malformed renewal or abandon is a clear
    error, and the connection goes on serving (no mesh here: a valid one is a no-op)."""
    reply = raw.call({"op": "transfers", "id": 7, **fields})
    assert reply["error"]["code"] == "protocol", reply
    assert re.search(message, reply["error"]["message"]), reply
    ok = raw.call({"op": "transfers", "id": 8, "renew": [["node-p", "x1"]], "renew_s": 30})
    assert ok == {"id": 8, "renewed": 1, "abandoned": 0}


def test_the_client_renews_only_with_an_agent_that_speaks_protocol_2(agent: AgentProcess) -> None:
    with agent.client() as client:
        assert client.hello().version == 2
        assert client.transfers(renew=[("node-p", "x1")], abandon=[("node-p", "x2")], renew_s=5)
