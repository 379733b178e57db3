"""The mesh shell: drives the sans-IO cores with a real transport and the loop's clock.

``MeshNode`` is the agent's ``MeshService``. It owns:

* the transport listener (the peer port) and the peer links (``links.py``),
* the membership core (SWIM + Lifeguard) and the directory core, fed with received
  messages and ticked by one timer task at their ``next_deadline()``; membership events
  rebuild the ring, which the directory adopts (hand-off, purge of departed holders,
  re-announce of keys whose home moved),
* the fetcher (``fetch.py``), the ``ChunkSource`` it registers with the agent's puller
  (``meshkv/puller.py``, the one path that makes chunks resident here), and the pusher
  (``pusher.py``) that copies committed chunks to ring successors and transfer chunks to
  the decode node a request names,
* the peer server (``peer_server.py``) that serves what peers ask.

The helpers never see this class: they depend on the protocols of ``seams.py``
(``NodeView``, ``PeerDelegate``, ``Residency``), which the node implements.

Nothing from a peer is acted on before the transport's HMAC handshake has authenticated
it. Every task has an owner (``self._tasks``); shutdown is staged: gossip LEFT and keep
ticking for ``leave_propagate_s``, cancel the tasks, stop the listener, close the links.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from meshkv.chunk import ChunkKey, NamespaceId
from meshkv.errors import ConfigError, MeshKVError, ProtocolError
from meshkv.mesh import messages as mm
from meshkv.mesh.directory import Directory
from meshkv.mesh.fetch import Fetcher
from meshkv.mesh.links import PeerLinks
from meshkv.mesh.membership import EventKind, Member, MemberEvent, Membership
from meshkv.mesh.options import MeshNodeConfig
from meshkv.mesh.peer_server import PeerServer
from meshkv.mesh.pusher import Pusher
from meshkv.mesh.ring import Ring
from meshkv.mesh.seams import Residency
from meshkv.mesh.tls import TlsFiles
from meshkv.transport.base import (
    Connection,
    Listener,
    Transport,
    TransportConfig,
    format_address,
    parse_address,
)
from meshkv.transport.framing import MAX_PAYLOAD_BYTES, MsgKind

if TYPE_CHECKING:
    from aiohttp import web

    from meshkv.config import AgentConfig
    from meshkv.metrics import AgentMetrics
    from meshkv.puller import Puller
    from meshkv.store import Store
    from meshkv.transfers import Transfers

logger = logging.getLogger(__name__)

_WIRE_KIND: dict[type, MsgKind] = {
    mm.Ping: MsgKind.PING,
    mm.Ack: MsgKind.ACK,
    mm.PingReq: MsgKind.PING_REQ,
    mm.Nack: MsgKind.ACK,
    mm.Gossip: MsgKind.GOSSIP,
    mm.PushPull: MsgKind.PUSH_PULL,
    mm.Announce: MsgKind.DIR_ANNOUNCE,
    mm.Handoff: MsgKind.DIR_ANNOUNCE,
}
"""Transport frame kind of each core message sent one-way."""

PUSH_SWEEP_S = 60.0
REPAIR_SETTLE_S = 1.0
"""Wait after a ring change before repair asks the homes (holders re-announce moved keys)."""
REPAIR_BATCH = 512
REPAIR_LOOKUP_S = 2.0
JOIN_GRACE_S = 30.0
"""A node id conflict met this soon after start, on a connection this agent dialled, means
this agent is the newcomer: it refuses to run instead of fighting the established one."""
ID_CONFLICTS_KEPT = 16
ALONE_WARN_AFTER_S = 10.0
"""A node given seeds that is still the only member alive this long after start says so
(a mistyped --join, a wrong secret, a firewall), and again every ``ALONE_WARN_EVERY_S``."""
ALONE_WARN_EVERY_S = 60.0
WARM_CONNECT_S = 10.0
"""Deadline of the data connection opened to a member when it joins."""
"""A pushed payload whose frame never completed gives its reserved slot back after this."""


def make_transport(name: str, config: TransportConfig, tls: TlsFiles | None = None) -> Transport:
    """The peer transport called ``name`` (``tcp`` or ``ucx``), with mutual TLS if given."""
    if name == "tcp":
        from meshkv.transport.tcp import TcpOptions, TcpTransport

        if tls is None:
            return TcpTransport(config)
        server, client = tls.contexts()
        return TcpTransport(config, TcpOptions(server_ssl=server, client_ssl=client))
    if name == "ucx":
        try:
            from meshkv.transport.ucx import UcxTransport
        except ImportError as exc:
            raise ConfigError(
                f"--transport ucx needs ucxx (pip install meshkv[ucx]): {exc}"
            ) from exc
        return UcxTransport(config)
    raise ConfigError(f"unknown transport {name!r}")


class MeshNode:
    """One agent's membership in the mesh (the agent's ``MeshService``)."""

    def __init__(
        self,
        node_id: str,
        config: MeshNodeConfig,
        store: Store,
        residency: Residency,
        *,
        transfers: Transfers | None = None,
        seed: int | None = None,
        transport: Transport | None = None,
    ) -> None:
        """``residency``: the agent's puller (the peer server promotes through it before it
        serves a chunk kept on SSD); ``transfers``: the producer-side holds, released when a
        consumer says ``TRANSFER_DONE``. ``transport``: use this one instead of building
        ``config.transport`` (tests and simulations pass a ``MemoryTransport``)."""
        self._node_id = node_id
        self.config = config
        self.store = store
        self.transfers = transfers
        self._rng = random.Random(seed if seed is not None else os.urandom(8))
        # No peer frame may carry more than the largest chunk this node can store: a peer
        # that knows the secret still cannot make it allocate more per frame.
        largest = min(MAX_PAYLOAD_BYTES, store.config.cpu.segment_bytes)
        self.transport = transport or make_transport(
            config.transport,
            TransportConfig(secret=config.secret, node_id=node_id, max_payload_bytes=largest),
            config.tls,
        )
        self.address = config.advertise or config.listen
        self.ring = Ring([node_id], config.ring)
        self._alive: frozenset[str] = frozenset(self.ring.members)
        self.fetcher = Fetcher(
            self, store, holder_timeout_s=config.holder_timeout_s, seed=self._rng.getrandbits(32)
        )
        self.pusher = Pusher(self, store, replicas=config.replicas, timeout_s=config.pull_timeout_s)
        self.peer_server = PeerServer(self, store, residency)
        self.last_heard: dict[str, float] = {}
        """loop.time() of the last membership message from each member."""
        self.events: Counter[str] = Counter()
        """Membership events seen, by kind."""
        self.checksum_failures = 0
        self.drive_errors = 0
        """Driver steps that raised (logged; the driver keeps going)."""
        self._membership: Membership | None = None
        self._directory: Directory | None = None
        self._listener: Listener | None = None
        self._links: PeerLinks | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake: asyncio.Event | None = None
        self._seq = 0
        self._closing = False
        self.id_conflicts: list[dict[str, Any]] = []
        """Refused handshakes with agents that claim this node's id (newest last, bounded)."""
        self._conflicts_seen = 0
        self._newcomer: bool | None = None  # decided by the first conflict this node meets
        self._started_at = 0.0
        self._next_alone_warning = 0.0
        self._on_fatal: Callable[[str], None] | None = None

    @property
    def node_id(self) -> str:
        return self._node_id

    # --- MeshService --------------------------------------------------------------------

    @property
    def membership(self) -> Membership:
        if self._membership is None:
            raise RuntimeError("mesh node not started")
        return self._membership

    @property
    def directory(self) -> Directory:
        if self._directory is None:
            raise RuntimeError("mesh node not started")
        return self._directory

    @property
    def incarnation(self) -> int:
        return 0 if self._membership is None else self._membership.incarnation

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        host, port = parse_address(self.config.listen)
        self._listener = await self.transport.listen(
            host, port, self.peer_server.handle, alloc=self.peer_server.alloc
        )
        if self.config.advertise is None:
            _, real_port = parse_address(self._listener.address)
            self.address = format_address(host, real_port)
        self._links = PeerLinks(
            self.transport,
            self.peer_server.handle,
            connect_timeout_s=self.config.connect_timeout_s,
            send_timeout_s=self.config.send_timeout_s,
            queue_limit=self.config.control_queue_limit,
            connections_per_peer=self.config.connections_per_peer,
        )
        now = loop.time()
        self._membership = Membership(
            self.node_id, self.address, self.config.membership, self._rng, now
        )
        self._directory = Directory(self.node_id, self.config.directory, self._rng, now)
        self._send_all(self._directory.set_ring(self.ring, {self.node_id: self.address}, now))
        held = [e.key for e in self.store.cpu.entries()]
        if self.store.ssd is not None:
            held.extend(self.store.ssd.chunk_keys())
        self._directory.add_local(held, now)
        self.store.add_listener(self)
        self._started_at = now
        self._send_all(self._membership.join(list(self.config.join), now))
        self._spawn(self._drive(), "drive")
        logger.info(
            "mesh node %s on %s (%s), joining %s, replicas %d, preset %s",
            self.node_id,
            self.address,
            self.config.transport,
            ",".join(self.config.join) or "nobody (first node)",
            self.config.replicas,
            self.config.preset,
        )

    async def close(self, deadline: float) -> None:
        """Leave gracefully (LEFT is gossiped), then stop everything by ``deadline``."""
        if self._closing:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        membership, links = self._membership, self._links
        if membership is not None and links is not None and membership.num_alive > 1:
            self._send_all(membership.leave(loop.time()))
            end = min(deadline, loop.time() + self.config.membership.leave_propagate_s)
            while loop.time() < end:
                self._send_all(membership.tick(loop.time()))
                await asyncio.sleep(min(0.05, max(0.0, end - loop.time())))
            await links.flush(max(0.0, min(0.5, deadline - loop.time())))
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=max(0.1, deadline - loop.time()))
        await self.pusher.close()
        await self.fetcher.close()
        self.peer_server.abort_all()
        if self._listener is not None:
            await self._listener.close()
        if links is not None:
            await links.close()
        await self.transport.close()
        logger.info("mesh node %s left", self.node_id)

    def on_fatal(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)`` when this node must not go on (its id is taken)."""
        self._on_fatal = callback

    def _check_id_conflicts(self, now: float) -> None:
        """A handshake refused for a shared node id (either side) is a misconfiguration.
        If the first such conflict comes within the join grace after start, on a connection
        this node dialled, this node is the newcomer: it refuses to run. The agent
        that was dialled, or one already established, keeps serving, but says so in the
        log, the metrics and ``meshkv ring status`` every time it happens."""
        for addr in self.membership.take_claims():
            # another address claims our id: dial it; if an agent with our id answers,
            # the handshake is refused on both sides and recorded below
            self._send(addr, mm.Gossip(self.node_id, ()))
        stats = self.transport.stats
        if stats.id_conflicts == self._conflicts_seen:
            return
        self._conflicts_seen = stats.id_conflicts
        message = stats.last_id_conflict
        self.id_conflicts.append({"message": message, "at_s": round(now - self._started_at, 3)})
        del self.id_conflicts[:-ID_CONFLICTS_KEPT]
        if self._newcomer is None:
            # The first conflict decides: the agent that dialled first learned of the other
            # from the mesh's state, so the other was there before it.
            fresh = now - self._started_at < JOIN_GRACE_S
            self._newcomer = stats.last_id_conflict_outgoing and fresh
        joining = self._newcomer
        if joining and self._on_fatal is not None:
            reason = (
                f"node id {self.node_id!r} (this agent, {self.address}) is already in use in "
                f"the mesh: {message}"
            )
            logger.error("refusing to join: %s", reason)
            self._on_fatal(reason)
        else:
            logger.error(
                "node id conflict: another agent claims %r (this agent is %s): %s",
                self.node_id,
                self.address,
                message,
            )

    def http_routes(self) -> list[web.RouteDef]:
        from meshkv.mesh.admin import routes

        return routes(self)

    def status_section(self) -> dict[str, Any]:
        return {
            "mesh": {
                "node_id": self.node_id,
                "address": self.address,
                "transport": self.config.transport,
                "incarnation": self.incarnation,
                "alive_members": self.membership.num_alive if self._membership else 1,
                "ring_digest": self.ring.digest,
                "directory_keys": self._directory.num_entries if self._directory else 0,
                "replicas": self.config.replicas,
                "id_conflicts": list(self.id_conflicts),
                "join_errors": self.join_errors(),
            }
        }

    def metrics_snapshot(self) -> dict[str, Any]:
        """Plain numbers for ``meshkv.metrics.MeshCollector``."""
        states: Counter[str] = Counter({"alive": 1})
        for m in self.known_members():
            states[m.state.name.lower()] += 1
        fs = self.fetcher.stats
        ps = self.pusher.stats
        ms = self._membership.stats if self._membership else None
        return {
            "members": dict(states),
            "events": dict(self.events),
            "suspicions": self.events["suspect"],
            "refutations": ms.refutes if ms else 0,
            "probe_failures": ms.probe_failures if ms else 0,
            "directory_keys": self._directory.num_entries if self._directory else 0,
            "held_keys": self._directory.held() if self._directory else 0,
            "ring_members": len(self.ring),
            "pulls_ok": fs.pulls_ok,
            "pull_bytes": fs.pull_bytes,
            "pull_failures": dict(fs.failures),
            "pull_latency": fs.latency,
            "handshake_failures": self.transport.stats.auth_failures,
            "id_conflicts": self.transport.stats.id_conflicts,
            "checksum_failures": self.checksum_failures + fs.failures["checksum"],
            "protocol_errors": self.transport.stats.protocol_errors,
            "served_bytes": self.peer_server.stats.bytes_served,
            "replica_pushes": ps.pushed - ps.transfer_pushed,
            "repairs_scheduled": ps.repairs_scheduled,
            "transfer_pushes": ps.transfer_pushed,
            "transfer_renewals_sent": fs.renewals,
            "push_failures": dict(ps.failures),
        }

    def own_stats(self) -> dict[str, Any]:
        """This node's chunk counts per tier and hit rate (answer to ``NODE_STATS``)."""
        snap = self.store.snapshot()
        tiers = {
            name: {"chunks": t.chunks, "bytes": t.usage_bytes} for name, t in snap.tiers.items()
        }
        hits = sum(t.hit_chunks for t in snap.tiers.values())
        total = hits + snap.miss_chunks
        return {
            "tiers": tiers,
            "chunks": sum(t["chunks"] for t in tiers.values()),
            "bytes": sum(t["bytes"] for t in tiers.values()),
            "hit_rate": None if total == 0 else hits / total,
        }

    async def member_stats(self, node: str, deadline: float) -> dict[str, Any]:
        if node == self.node_id:
            return self.own_stats()
        address = self.address_of(node)
        if address is None:
            raise LookupError(node)
        conn = await self.connection(address, deadline)
        reply = await conn.request(MsgKind.NODE_STATS, {}, deadline=deadline)
        return dict(reply.header)

    def known_members(self) -> list[Member]:
        return [] if self._membership is None else self._membership.members()

    @property
    def source(self) -> Fetcher:
        """The ``ChunkSource`` the agent registers with its puller."""
        return self.fetcher

    def push(self, ns: NamespaceId, keys: Sequence[ChunkKey], target: str) -> None:
        """Push ``keys`` to node ``target`` now (a prefill/decode transfer)."""
        self.pusher.push(ns, list(keys), target)

    # --- NodeView (fetcher, pusher, admin routes) ----------------------------------------

    def homes(self, keys: Sequence[ChunkKey]) -> list[str]:
        return self.ring.owners_many(keys)

    def home_of(self, key: ChunkKey) -> str:
        return self.ring.owner(key)

    def successors(self, key: ChunkKey, count: int) -> list[str]:
        if count <= 0:
            return []
        owners = self.ring.owners(key, count + 1)
        return [n for n in owners if n != self.node_id][:count]

    def is_alive(self, node: str) -> bool:
        """Alive or suspect, as of the last ring rebuild (the ring is exactly that set).
        A set lookup: this runs for every holder of every key of every lookup (asking the
        membership core per call copied a record each time and was the lookup's top cost)."""
        return node in self._alive

    def address_of(self, node: str) -> str | None:
        return None if self._membership is None else self._membership.address_of(node)

    async def connection(self, address: str, deadline: float) -> Connection:
        if self._links is None:
            raise RuntimeError("mesh node not started")
        return await self._links.data(address, deadline)

    async def lookup_at(
        self, home: str, keys: Sequence[ChunkKey], deadline: float
    ) -> tuple[tuple[str, ...], ...]:
        """Holders of ``keys`` as their home knows them (asked over the network unless
        this node is the home)."""
        if home == self.node_id:
            return tuple(self.directory.answer_lookup(keys, self.now()))
        address = self.address_of(home)
        if address is None:
            return tuple(() for _ in keys)
        self._seq += 1
        request = mm.Lookup(self._seq, self.node_id, tuple(bytes(k) for k in keys))
        conn = await self.connection(address, deadline)
        reply = await conn.request(MsgKind.DIR_LOOKUP, {"m": request.to_wire()}, deadline=deadline)
        answer = mm.decode(reply.header.get("m"))
        if not isinstance(answer, mm.LookupReply) or len(answer.holders) != len(keys):
            raise ProtocolError(f"home {home} answered a lookup with a bad reply")
        return answer.holders

    # --- PeerDelegate (the peer server) --------------------------------------------------

    def holders_here(self, keys: Sequence[bytes]) -> tuple[tuple[str, ...], ...]:
        """Home side of a peer's lookup."""
        return tuple(self.directory.answer_lookup(keys, self.now()))

    def not_held(self, key: ChunkKey) -> None:
        """A peer asked for ``key`` and this node does not hold it: tell its home, so the
        stale entry is dropped there instead of being handed out again."""
        now = self.now()
        self.directory.drop_local([key], now)  # never re-announce it either
        msg = mm.Announce(self.node_id, (), (bytes(key),))
        home = self.home_of(key)
        if home == self.node_id:
            self.directory.handle(self.address, msg, now)
        else:
            address = self.address_of(home)
            if address is not None:
                self._send(address, msg)

    def transfer_done(self, consumer: str, transfer_id: str) -> None:
        if self.transfers is not None and self.transfers.done(transfer_id):
            logger.debug("transfer %s released by %s", transfer_id, consumer)

    def transfer_renew(self, consumer: str, transfer_ids: Sequence[str], seconds: float) -> None:
        if self.transfers is not None:
            renewed = self.transfers.renew(transfer_ids, seconds)
            logger.debug("%d of %d transfers renewed by %s for %.1f s", renewed,
                         len(transfer_ids), consumer, seconds)  # fmt: skip

    def count_checksum_failure(self) -> None:
        self.checksum_failures += 1

    def on_membership(self, sender: str, src: str, msg: mm.Message) -> None:
        if self._membership is None or self._closing:
            return
        now = self.now()
        self.last_heard[sender] = now
        self._send_all(self._membership.handle(src, msg, now))
        self._poke()

    def on_directory(self, src: str, msg: mm.Announce | mm.Handoff) -> None:
        if self._directory is None or self._closing:
            return
        self._send_all(self._directory.handle(src, msg, self.now()))

    # --- internals ----------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"meshkv-mesh-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("mesh task %s failed", task.get_name(), exc_info=task.exception())

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _send_all(self, outgoing: Iterable[mm.Outgoing]) -> None:
        for out in outgoing:
            self._send(out.to, out.msg)

    def _send(self, address: str, msg: mm.Message) -> None:
        if self._links is None:
            return
        if address == self.address:
            logger.debug("core addressed %s to this node; dropped", type(msg).__name__)
            return
        kind = _WIRE_KIND.get(type(msg))
        if kind is None:
            logger.error("core produced a %s, which is not sent one-way", type(msg).__name__)
            return
        self._links.send(address, kind, {"m": msg.to_wire(), "src": self.address})

    async def _drive(self) -> None:
        """Tick the cores at their deadlines (or when a message may have changed them)."""
        loop = asyncio.get_running_loop()
        membership, directory, wake = self.membership, self.directory, self._wake
        assert wake is not None
        next_sweep = loop.time() + PUSH_SWEEP_S
        while True:
            now = loop.time()
            try:
                if membership.next_deadline() <= now:
                    self._send_all(membership.tick(now))
                self._apply_events(membership.drain_events(), now)
                if directory.next_deadline() <= now:
                    self._send_all(directory.tick(now))
                if now >= next_sweep:
                    next_sweep = now + PUSH_SWEEP_S
                    self.peer_server.sweep(now - PUSH_SWEEP_S)
                self._check_id_conflicts(now)
                self._warn_if_alone(now)
            except Exception:  # a bug in one step must not stop the node's heartbeat
                self.drive_errors += 1
                logger.exception("mesh driver step failed; continuing")
                await asyncio.sleep(self.config.tick_interval_s)
            due = min(membership.next_deadline(), directory.next_deadline(), next_sweep)
            wait = min(due - loop.time(), 1.0) if math.isfinite(due) else 1.0
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), max(0.0005, wait))

    def join_errors(self) -> dict[str, str]:
        """While this node has seeds and no other member alive: each seed and why it was
        not joined (the last failure of a connection to it, or that it never answered)."""
        if not self.config.join or self._membership is None or self.membership.num_alive > 1:
            return {}
        failures = self._links.stats.last_failure if self._links is not None else {}
        return {
            seed: failures.get(seed, "no answer to the join (yet)")
            for seed in self.config.join
            if seed != self.address
        }

    def _warn_if_alone(self, now: float) -> None:
        if now - self._started_at < ALONE_WARN_AFTER_S or now < self._next_alone_warning:
            return
        errors = self.join_errors()
        if not errors:
            return
        self._next_alone_warning = now + ALONE_WARN_EVERY_S
        logger.warning(
            "still the only member alive %.0f s after start; not joined through %s "
            "(check --join, the mesh secret, TLS and firewalls)",
            now - self._started_at,
            "; ".join(f"{seed}: {why}" for seed, why in errors.items()),
        )

    async def _warm(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self.connection(address, loop.time() + WARM_CONNECT_S)
        except (MeshKVError, OSError, RuntimeError) as exc:
            logger.debug("warming a connection to %s: %s", address, exc)

    def _apply_events(self, events: list[MemberEvent], now: float) -> None:
        if not events:
            return
        membership = self.membership
        for event in events:
            self.events[event.kind.value] += 1
            logger.info(
                "member %s (%s) %s, incarnation %d",
                event.node,
                event.addr,
                event.kind.value,
                event.incarnation,
            )
            if event.kind in (EventKind.DEAD, EventKind.LEFT) and self._links is not None:
                self._links.forget(event.addr)
                self.fetcher.forget(event.node)
            elif event.kind is EventKind.JOINED and not self._closing:
                # Open (and authenticate) a data connection now, not inside the first
                # lookup's budget: a UCX endpoint takes hundreds of ms to set up under load.
                self._spawn(self._warm(event.addr), f"warm-{event.node}")
        members = membership.alive()
        if tuple(members) != self.ring.members:
            departed = frozenset(self.ring.members) - frozenset(members)
            self.ring = Ring(members, self.config.ring)
            if departed and self.config.replicas > 1 and not self._closing:
                self._spawn(self._repair(departed), "repair")
            self._alive = frozenset(self.ring.members)
            addresses = {m: a for m in members if (a := membership.address_of(m)) is not None}
            self._send_all(self.directory.set_ring(self.ring, addresses, now))
            logger.info(
                "ring rebuilt: %d members, digest %s", len(self.ring), self.ring.digest[:16]
            )

    async def _repair(self, departed: frozenset[str]) -> None:
        """Re-make the copies ``departed`` took with them. After the directory settled (the
        holders re-announced keys whose home moved), ask the homes who still holds each
        chunk held here; for a chunk with fewer than ``--replicas`` live holders, the live
        holder that comes first in the key's preference order (the same answer on every
        node with this ring) copies it to the next members of that order, paced at
        ``repair_chunks_per_s``. Every holder of a key decides alike, so each missing copy
        is made once."""
        await asyncio.sleep(REPAIR_SETTLE_S)
        ring, r = self.ring, self.config.replicas
        held = [e.key for e in self.store.cpu.entries()]
        if self.store.ssd is not None:
            seen = set(held)
            held.extend(k for k in self.store.ssd.chunk_keys() if k not in seen)
        logger.info("repair after %s left: checking %d chunks", sorted(departed), len(held))
        self.pusher.stats.repair_sweeps += 1
        interval = 1.0 / self.config.repair_chunks_per_s
        for start in range(0, len(held), REPAIR_BATCH):
            if self._closing or self.ring is not ring:
                return  # the ring moved again: the sweep of that change takes over
            batch = held[start : start + REPAIR_BATCH]
            holders: dict[ChunkKey, tuple[str, ...]] = {}
            for home, raw in self.directory.plan_lookup(batch).items():
                keys = [ChunkKey(k) for k in raw]
                try:
                    answer = await self.lookup_at(home, keys, self.now() + REPAIR_LOOKUP_S)
                except (MeshKVError, OSError) as exc:
                    logger.info("repair: home %s did not answer: %s", home, exc)
                    continue
                holders.update(zip(keys, answer, strict=True))
            for key in batch:
                if key not in holders:
                    continue
                live = {h for h in holders[key] if h in self._alive} | {self.node_id}
                if len(live) >= r:
                    continue
                order = ring.owners(key, len(ring))
                if min(live, key=order.index) != self.node_id:
                    continue
                for target in [n for n in order if n not in live][: r - len(live)]:
                    await self.pusher.repair_push(key, target)
                    await asyncio.sleep(interval)

    # --- StoreListener ------------------------------------------------------------------

    def committed(self, key: ChunkKey, from_engine: bool) -> None:
        if self._directory is None or self._closing:
            return
        self._directory.add_local([key], self.now())
        self._poke()
        if from_engine:  # pulled or pushed chunks are not copied on again
            self.pusher.replicate(key)

    def dropped(self, keys: list[ChunkKey]) -> None:
        if self._directory is None or self._closing:
            return
        self._directory.drop_local(keys, self.now())
        self._poke()

    def aborted(self, key: ChunkKey) -> None:
        """Nothing was announced for a reservation."""


def create_mesh_service(
    config: AgentConfig,
    store: Store,
    metrics: AgentMetrics,
    puller: Puller,
    transfers: Transfers | None,
) -> MeshNode:
    """The agent's default mesh factory: the mesh node ``config.mesh`` describes, wired to
    the agent's puller (chunks it cannot find locally come through this node) and
    transfers (pushes to decode nodes go through it)."""
    if config.mesh is None:
        raise ConfigError("create_mesh_service needs AgentConfig.mesh")
    node = MeshNode(config.node_id, config.mesh, store, puller, transfers=transfers)
    puller.add_source(node.source)
    if transfers is not None:
        transfers.set_pusher(node.push)
    from meshkv.metrics import MeshCollector

    metrics.register(MeshCollector(node))
    return node
