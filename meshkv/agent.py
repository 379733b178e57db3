"""``Agent``: builds the node's parts, owns their tasks, and shuts them down in stages.

One asyncio event loop (uvloop when installed), no loops in threads. Start order: store
(arena + SSD scan) → metrics → puller and transfers → mesh (optional) → local socket → HTTP
admin → ready file.
Stop (SIGTERM/SIGINT or ``request_stop``) runs in reverse, in stages bounded by
``drain_seconds``: stop accepting, drain in-flight requests, close connections (their pins
and reservations are released), stop the mesh, close the store (flush SSD write-back,
unlink the arena), remove the socket and the ready file.

The agent is the composition root. It builds the ``Puller`` (the one path that makes
chunks resident: SSD promotions, peer pulls, transfer waits) and the ``Transfers``
(prefill/decode holds) and hands both to the local server. The mesh plugs in through
``MeshService``: when ``AgentConfig.mesh`` is set the agent builds one with its
``mesh_factory`` (``meshkv.mesh.node.create_mesh_service`` unless a test passes another),
which registers itself with the puller as its chunk source and with the transfers as their
pusher; the HTTP app gets the mesh's routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from meshkv import __version__
from meshkv.config import AgentConfig
from meshkv.errors import ConfigError, NodeIdConflict
from meshkv.loop import run_main
from meshkv.metrics import AgentMetrics, PullerCollector, RemoteCollector
from meshkv.puller import Puller
from meshkv.server.http import AdminContext, AdminServer, build_app
from meshkv.server.local import LocalServer, LocalServerConfig
from meshkv.store import Store
from meshkv.tiers.remote import RemoteTier
from meshkv.transfers import Transfers

logger = logging.getLogger(__name__)


class MeshService(Protocol):
    """What the agent needs from the mesh (see docs/internals.md, agent ↔ mesh seam)."""

    async def start(self) -> None: ...

    async def close(self, deadline: float) -> None: ...

    def http_routes(self) -> list[web.RouteDef]: ...

    def status_section(self) -> dict[str, Any]: ...

    def on_fatal(self, callback: Callable[[str], None]) -> None: ...


MeshFactory = Callable[[AgentConfig, Store, AgentMetrics, Puller, Transfers], MeshService]


class Agent:
    """One node's agent. ``await agent.run()`` serves until ``request_stop``/a signal."""

    def __init__(self, config: AgentConfig, *, mesh_factory: MeshFactory | None = None) -> None:
        self.config = config
        self.store = Store(config.store)
        self.metrics = AgentMetrics(self.store.snapshot, config.node_id)
        self.puller = Puller(self.store)
        self.transfers = Transfers(self.store)
        self.puller.set_local_holds(config.node_id, self.transfers)
        self.metrics.register(PullerCollector(self.puller, self.transfers))
        self.mesh: MeshService | None = None
        self.remote: RemoteTier | None = None
        self._mesh_factory = mesh_factory
        self.local: LocalServer | None = None
        self.http: AdminServer | None = None
        self.http_address: tuple[str, int] | None = None
        self._stop = asyncio.Event()
        self._started = False
        self._closed = False
        self.fatal_error: str | None = None
        """Why the agent stopped on its own (e.g. its node id is taken); None otherwise."""

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self._closed = False
        admin_token = cfg.admin_token()  # fail before anything is created
        prepare_socket_path(cfg.socket_path)
        await self.store.start()
        self._started = True
        try:
            if cfg.remote is not None:
                self.remote = RemoteTier(cfg.remote, self.store)
                await self.remote.start()
                self.puller.add_remote(self.remote)
                self.metrics.register(RemoteCollector(self.remote))
            if cfg.mesh is not None:
                factory = self._mesh_factory or _default_mesh_factory
                self.mesh = factory(cfg, self.store, self.metrics, self.puller, self.transfers)
                self.mesh.on_fatal(self._fatal)
                await self.mesh.start()
            self.local = LocalServer(
                LocalServerConfig(cfg.socket_path, cfg.node_id, cfg.lease_seconds),
                self.store,
                puller=self.puller,
                metrics=self.metrics,
                transfers=self.transfers,
            )
            await self.local.start()
            ctx = AdminContext(
                self.store, self.metrics, cfg.node_id, admin_token, registry=self.local.registry
            )
            ctx.status_sections.append(self._status_section)
            if self.remote is not None:
                remote = self.remote
                ctx.status_sections.append(lambda: {"remote": remote.status()})
            routes: list[web.RouteDef] = []
            if self.mesh is not None:
                ctx.status_sections.append(self.mesh.status_section)
                ctx.status_sections.append(self._transfers_section)
                routes = self.mesh.http_routes()
            self.http = AdminServer(build_app(ctx, routes), cfg.http_host, cfg.http_port)
            self.http_address = await self.http.start()
        except BaseException:
            await self.close()
            raise
        host, port = self.http_address
        if not _is_loopback(host):
            logger.warning(
                "admin HTTP listens on %s:%d, off loopback: anyone who reaches it reads metrics "
                "and status; mutations %s",
                host,
                port,
                "need the admin token" if admin_token else "are disabled (no admin token)",
            )
        logger.info(
            "meshkv agent %s serving: socket %s, http %s:%d, arena %s (%d bytes), pid %d",
            cfg.node_id,
            cfg.socket_path,
            host,
            port,
            self.store.arena_name,
            self.store.arena_size,
            os.getpid(),
        )
        if cfg.ready_file:
            try:
                write_json_atomic(cfg.ready_file, self.ready_info())
            except OSError as exc:  # whoever waits for the file would wait forever
                raise ConfigError(
                    f"cannot write the ready file {cfg.ready_file}: {exc.strerror or exc}"
                ) from exc

    def ready_info(self) -> dict[str, Any]:
        """What the ready file says (tests and scripts read it)."""
        assert self.http_address is not None
        host, port = self.http_address
        return {
            "node_id": self.config.node_id,
            "pid": os.getpid(),
            "socket": self.config.socket_path,
            "http": f"{host}:{port}",
            "arena_name": self.store.arena_name,
            "arena_size": self.store.arena_size,
            "version": __version__,
        }

    def _status_section(self) -> dict[str, Any]:
        local = self.local
        counters = self.metrics.local
        hits = sum(counters.hit_chunks.values())
        asked = hits + counters.miss_chunks
        return {
            "local": {
                "socket": self.config.socket_path,
                "connections": len(local.connections) if local else 0,
                "arena_name": self.store.arena_name,
                "arena_size": self.store.arena_size,
                "lookups": counters.lookups,
                "lookup_hit_chunks": dict(counters.hit_chunks),
                "lookup_miss_chunks": counters.miss_chunks,
                "lookup_hit_rate": round(hits / asked, 4) if asked else None,
                "protocol_errors": counters.protocol_errors,
            }
        }

    def _transfers_section(self) -> dict[str, Any]:
        """Prefill/decode transfers: held here for decode nodes (producer) and received
        from prefill nodes (consumer)."""
        held, got = self.transfers.stats, self.puller.stats
        return {
            "transfers": {
                "held": self.transfers.open,
                "pins": self.transfers.pinned,
                "released": held.released,
                "expired": held.expired,
                "evicted": held.evicted,
                "renewals": held.renewed,
                "received": got.transfers,
                "incomplete": got.transfers_incomplete,
                "abandoned": got.transfers_abandoned,
            }
        }

    def _fatal(self, reason: str) -> None:
        if self.fatal_error is None:
            self.fatal_error = reason
        self.request_stop()

    def request_stop(self) -> None:
        """Ask ``run`` to shut down (signal-safe: only sets an event)."""
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until stopped (SIGTERM/SIGINT), then shut down in stages."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop.wait()
            logger.info("stopping agent %s", self.config.node_id)
        finally:
            # A second signal while stopping must not kill the agent half-way: that would
            # strand the arena in /dev/shm (RAM) and the socket. The staged shutdown is
            # bounded by drain_seconds already; SIGKILL remains the hard stop.
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._already_stopping)
            try:
                await self.close()
            finally:
                # Stopping is done, but the interpreter still has to exit: a signal that
                # arrives now must not turn a clean stop into death by SIGTERM (exit -15).
                # The handler goes straight to SIG_IGN. Not through remove_signal_handler:
                # that restores the default action first, and blocking the signals here
                # covers only this thread; the others (thread pools, libuv's workers) would
                # take the signal in that instant and the default action kills the process
                # (seen once in CI: exit -15 under a SIGTERM every millisecond). uvloop
                # leaves the disposition alone when it closes a loop that is not running.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_IGN)

    def _already_stopping(self) -> None:
        logger.warning(
            "already stopping (bounded by drain_seconds=%.1f s); SIGKILL forces it",
            self.config.drain_seconds,
        )

    async def close(self) -> None:
        """Staged shutdown bounded by ``drain_seconds`` (safe to call twice: a start that
        failed has closed already, and the second call finds nothing to do)."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_seconds
        started = time.monotonic()
        if self.local is not None:
            self.local.stop_accepting()
        if self.http is not None:
            await self.http.close()
            self.http = None
        if self.local is not None:
            await self.local.close(deadline)
            self.local = None
        await self.puller.close()
        self.transfers.release_all()
        if self.remote is not None:
            # What engines stored last is still being copied: let it reach the remote tier
            # (within the drain budget), so a restart or an upgrade finds it there.
            if not await self.remote.drain(max(0.0, deadline - loop.time())):
                logger.warning("shutdown: the remote tier's write-behind queue was not emptied")
            await self.remote.close()
            self.remote = None
        if self.mesh is not None:
            await self.mesh.close(deadline)
            self.mesh = None
        if self._started:
            self._started = False
            await self.store.close(deadline)
        if self.config.ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.ready_file)
        self._closed = True
        logger.info("agent stopped in %.3f s", time.monotonic() - started)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare_socket_path(path: str) -> None:
    """Create the socket's directory (0700) and remove a stale socket of a dead agent.

    A socket that still accepts connections belongs to a live agent: refuse rather than
    steal it (two agents on one host must use two sockets).
    """
    directory = Path(path).parent
    if not directory.exists():
        try:
            directory.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the socket directory {directory}: {exc.strerror or exc}; "
                "pass a --socket path in a directory this agent's user can write"
            ) from exc
    elif not directory.is_dir():
        raise ConfigError(f"socket directory {directory} is not a directory")
    # Whoever may write the directory may replace the socket and see the engines' traffic.
    st = directory.stat()
    if st.st_uid != os.getuid():
        raise ConfigError(
            f"socket directory {directory} belongs to uid {st.st_uid}, not to this agent's "
            f"user ({os.getuid()}); use a directory of your own"
        )
    if st.st_mode & 0o022:
        raise ConfigError(
            f"socket directory {directory} is writable by group or others (mode "
            f"{st.st_mode & 0o777:o}); run: chmod go-w {directory}"
        )
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError:
        logger.warning("removing stale socket %s of an agent that is gone", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ConfigError(f"another agent is already serving on {path}; pass a different --socket")


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.write("\n")
    os.replace(tmp, path)


def _default_mesh_factory(
    config: AgentConfig,
    store: Store,
    metrics: AgentMetrics,
    puller: Puller,
    transfers: Transfers,
) -> MeshService:
    # Imported on first use: an agent without a mesh never loads the mesh's modules.
    from meshkv.mesh.node import create_mesh_service

    return create_mesh_service(config, store, metrics, puller, transfers)


def run_agent(config: AgentConfig) -> None:
    """Run an agent to completion on a fresh event loop (uvloop when installed)."""
    agent = Agent(config)
    run_main(agent.run())
    if agent.fatal_error is not None:
        raise NodeIdConflict(agent.fatal_error)
