"""Network faults for benchmarks and tests: a TCP proxy that damages chunk payloads on the
wire, and a network namespace joined to this one by a veth pair whose link can be cut.

Both are real: the proxy is a socket relay between two real agents; the namespace is a
kernel network namespace (``ip netns``, root only) with addresses inside it only.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
from typing import Any

from meshkv.launch import AgentProcess, LaunchError


class CorruptingProxy:
    """TCP relay to ``target`` that, while ``active``, flips the last byte of every block
    of at least ``min_block`` bytes the server sends back once ``offset`` bytes of that
    stream have passed. Chunk payloads arrive in full 64 KiB blocks; handshakes, gossip
    and directory messages are smaller, so only payloads are damaged."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        offset: int = 0,
        min_block: int = 1,
        active: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        self.target = target
        self.offset = offset
        self.min_block = min_block
        self.active = active
        self.corrupted = 0
        """Blocks damaged so far."""
        self.sock = socket.create_server((host, 0))
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="corrupting-proxy").start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._stop.is_set():  # closed while this connection was being set up
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for src, dst, corrupt in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, corrupt), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, corrupt: bool) -> None:
        seen = 0
        try:
            while True:
                data = bytearray(src.recv(1 << 16))
                if not data:
                    break
                if (
                    corrupt
                    and self.active
                    and len(data) >= self.min_block
                    and seen + len(data) > self.offset
                ):
                    data[-1] ^= 0xFF
                    self.corrupted += 1
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            self.sock.close()
            for s in self._conns:
                s.close()


def ip(*args: str) -> None:
    """Run ``ip ARGS``; ``LaunchError`` with its message when it fails."""
    try:
        out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"ip {' '.join(args)}: {exc}") from exc
    if out.returncode != 0:
        raise LaunchError(f"ip {' '.join(args)}: {out.stderr.strip()}")


class NetnsAgent(AgentProcess):
    """An agent started inside a network namespace, its admin port on ``admin_ip`` (an
    address of that namespace). Its Unix socket and arena stay reachable from here:
    ``ip netns exec`` changes the network only (and remounts ``/sys``)."""

    def __init__(self, *, netns: str, admin_ip: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.netns = netns
        self.admin_ip = admin_ip

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--http") + 1] = f"{self.admin_ip}:0"
        return ["ip", "netns", "exec", self.netns, *cmd]


class VethNamespace:
    """A network namespace linked to this one by a veth pair: ``host_ip`` here,
    ``ns_ip`` inside (a /30 of ``10.<net>.0.0``; names carry this process's pid so parallel
    runs do not collide). :meth:`cut` takes the namespace's end down, so packets between
    the two are dropped (connections time out, as in a real partition) until :meth:`heal`.
    """

    def __init__(self, tag: str, net: int = 79) -> None:
        suffix = f"{os.getpid() % 100000}"
        self.name = f"mkv{tag}{suffix}"
        self.host_dev = f"mk{tag}h{suffix}"[:15]
        self.ns_dev = f"mk{tag}n{suffix}"[:15]
        self.host_ip = f"10.{net}.0.1"
        self.ns_ip = f"10.{net}.0.2"
        self._made = False

    def __enter__(self) -> VethNamespace:
        ip("netns", "add", self.name)
        self._made = True
        try:
            ip("link", "add", self.host_dev, "type", "veth", "peer", self.ns_dev,
               "netns", self.name)  # fmt: skip
            ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
            ip("-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_dev)
            ip("link", "set", self.host_dev, "up")
            ip("-n", self.name, "link", "set", self.ns_dev, "up")
            ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cut(self) -> None:
        ip("-n", self.name, "link", "set", self.ns_dev, "down")

    def heal(self) -> None:
        ip("-n", self.name, "link", "set", self.ns_dev, "up")

    def close(self) -> None:
        if not self._made:
            return
        self._made = False
        subprocess.run(["ip", "link", "del", self.host_dev], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
