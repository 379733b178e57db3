"""The agent's Unix-socket server for engines on the node (the local channel).

Thin by design: decode a frame, call the ``Store`` (and the ``Puller`` for chunks that
are not in the arena yet, the ``Transfers`` for prefill/decode holds), encode the reply.
Each connection is an ``asyncio.Protocol`` (measured: faster than streams for small
frames, see ``docs/local-protocol.md``); synchronous store calls are answered inside
``data_received`` without creating a task, and only ``read`` (which may wait for disk or
a peer) and lookups that consult the mesh run as tasks, at most ``MAX_INFLIGHT_PER_CONN``
per connection (reading pauses beyond that).

Errors go back as ``{id, error: {code, message}}`` and the connection keeps serving,
except for frames that break the stream (oversized, undecodable, truncated at EOF) and
a failed version negotiation: those get an error reply and close that connection only.
When a connection closes, its reservations and pins are released (``release_owner``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import socket
import struct
import time
import typing
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from meshkv import __version__
from meshkv.chunk import KEY_BYTES, ChunkKey, Namespace, NamespaceId
from meshkv.errors import (
    ConfigError,
    MeshKVError,
    NoSpace,
    NotPinned,
    NotReserved,
    ProtocolError,
    StoreError,
    VersionMismatch,
)
from meshkv.metrics import LocalCounters
from meshkv.protocol import (
    MAX_KEYS_PER_REQUEST,
    OPS,
    FrameReader,
    Op,
    encode,
    error_reply,
    negotiate,
    parse_float,
    parse_ints,
    parse_keys,
    parse_optional_ints,
    prefix_length,
    unpack_body,
)
from meshkv.puller import Puller, TransferHint, combine_tiers
from meshkv.server.prefix import NamespaceRegistry
from meshkv.server.transfer_fields import (
    MAX_TRANSFER_S,
    parse_transfer_hint,
    parse_transfer_hold,
    parse_transfer_refs,
)
from meshkv.store import Pin, Store, Tier

if TYPE_CHECKING:
    from meshkv.metrics import AgentMetrics
    from meshkv.transfers import Transfers

logger = logging.getLogger(__name__)

MAX_INFLIGHT_PER_CONN = 32
"""Async requests (reads) one connection may have running before reading pauses."""

MAX_READ_WAIT_S = 30.0
"""Longest ``wait`` a read may ask for."""

LOOKUP_BUDGET_SHARE = 0.5
"""Share of a client's lookup budget the agent may spend asking the mesh: the rest is the
round trip and the client's own margin, so a slow mesh answer never looks like a dead
agent to the engine. A read's budget (the client's deadline beyond its ``wait``) is shared
the same way: promotions from a slow SSD are waited for at most ``wait`` plus this share
of it, so the answer comes while the engine still listens."""

Reply = dict[str, Any]
Handler = Callable[["_Connection", dict[str, Any]], "Reply | Awaitable[Reply]"]


@dataclasses.dataclass(slots=True)
class LocalServerConfig:
    """Settings of the local channel."""

    socket_path: str
    """Unix socket the agent listens on (mode 0600)."""
    node_id: str
    """This agent's node id, reported at hello."""
    lease_seconds: float = 30.0
    """How long a read pin lasts before the store reclaims it."""
    remote_lookup_timeout_s: float = 0.1
    """Longest a lookup may wait for the mesh (and at most ``LOOKUP_BUDGET_SHARE`` of the
    budget the client sends); past it, unanswered keys count as misses (the engine never
    waits on the network past its deadline)."""


class LocalServer:
    """Accepts engine connections on the Unix socket and serves the local protocol."""

    def __init__(
        self,
        config: LocalServerConfig,
        store: Store,
        *,
        puller: Puller,
        metrics: AgentMetrics | None = None,
        transfers: Transfers | None = None,
        registry: NamespaceRegistry | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.puller = puller
        self.metrics = metrics
        self.transfers = transfers
        self.registry = registry if registry is not None else NamespaceRegistry()
        """Namespaces engines declared at hello (prefix queries answer for these)."""
        self.connections: set[_Connection] = set()
        self.observers = metrics.op_observers() if metrics is not None else {}
        """Each op's latency histogram (one label lookup per agent, not per connection)."""
        self._server: asyncio.AbstractServer | None = None
        self._next_conn_id = 1  # owner ids of engine connections: 1 .. 2**62 - 1

    async def start(self) -> None:
        """Bind the socket (0600) and start accepting."""
        loop = asyncio.get_running_loop()
        path = self.config.socket_path
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            self._server = await loop.create_unix_server(self._new_connection, path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)

    def _new_connection(self) -> _Connection:
        conn_id = self._next_conn_id
        self._next_conn_id += 1
        return _Connection(self, conn_id)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, deadline: float) -> None:
        """Take no new requests; wait (until the ``loop.time()`` deadline) for in-flight
        ones to finish and send their replies."""
        loop = asyncio.get_running_loop()
        for conn in self.connections:
            conn.stop_reading()
        tasks = [t for c in self.connections for t in c.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))

    async def close(self, deadline: float) -> None:
        """Staged stop: stop accepting, drain until ``deadline``, close connections."""
        self.stop_accepting()
        await self.drain(deadline)
        for conn in list(self.connections):
            conn.close()
        await asyncio.sleep(0)  # let connection_lost run: pins go back before the store closes
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.socket_path)


def _stranger(transport: asyncio.BaseTransport) -> str | None:
    """Why the process at the other end of a local connection may not use this agent
    (None: it may). The socket is 0600 in a directory only this user can write, so only
    this user (and root) can connect; ``SO_PEERCRED`` checks it again per connection, in
    case the socket's mode or directory was loosened by hand: the arena is this user's,
    and a client of another user could read and damage every cached chunk."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None  # not a Unix socket of this platform: the file mode is the guard
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError as exc:
        return f"its credentials cannot be read ({exc})"
    pid, uid, _gid = _PEERCRED.unpack(raw)
    if uid in (os.getuid(), 0):
        return None
    return (
        f"pid {pid} runs as uid {uid}, this agent as uid {os.getuid()} "
        "(only the same user or root may connect)"
    )


_PEERCRED = struct.Struct("3i")


class _Connection(asyncio.Protocol):
    """One engine connection. Per-connection state: namespace, owner id, async tasks."""

    def __init__(self, server: LocalServer, conn_id: int) -> None:
        self.server = server
        self.store = server.store
        self.conn_id = conn_id
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.namespace: NamespaceId | None = None
        self.chunk_tokens = 0  # declared at hello; 0 = unknown (no token metrics)
        self.tasks: set[asyncio.Task[None]] = set()
        self._paused = False
        metrics = server.metrics
        self._observe = server.observers
        self._counters = metrics.local if metrics is not None else LocalCounters()

    # --- transport events ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = typing.cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self._counters.connections += 1
        stranger = _stranger(transport)
        if stranger is not None:
            self._counters.refused_peers += 1
            logger.warning("refused a local connection: %s", stranger)
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            for body in self.reader.feed(data):
                self._handle(body)
                if self.transport is None or self.transport.is_closing():
                    return
        except ProtocolError as exc:  # oversized frame: the stream cannot be resynced
            self._fail(None, exc)

    def eof_received(self) -> bool:
        if self.reader.pending:
            self._fail(
                None,
                ProtocolError(
                    f"truncated frame: connection ended with {self.reader.pending} bytes "
                    "of an incomplete frame"
                ),
            )
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._counters.connections -= 1
        for task in self.tasks:
            task.cancel()
        self.transport = None
        try:
            self.store.release_owner(self.conn_id)
        except Exception:  # e.g. the store already closed at shutdown: nothing to release
            logger.debug("release_owner(%d) after close", self.conn_id, exc_info=True)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def stop_reading(self) -> None:
        """Shutdown: no new requests from this connection (in-flight ones still reply)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
            self._paused = False  # never resumed by _task_done

    # --- dispatch -----------------------------------------------------------------

    def _handle(self, body: bytes) -> None:
        try:
            message = unpack_body(body)
        except ProtocolError as exc:  # undecodable: framing can no longer be trusted
            self._fail(None, exc)
            return
        if not isinstance(message, dict):  # well-framed but not a request: keep serving
            self._counters.protocol_errors += 1
            kind = type(message).__name__
            self._send(
                error_reply(None, ProtocolError(f"request must be a msgpack map, got {kind}"))
            )
            return
        request_id = message.get("id")
        if type(request_id) is not int:
            self._send(error_reply(None, ProtocolError("request 'id' must be an integer")))
            return
        op = message.get("op")
        handler = _HANDLERS.get(op) if isinstance(op, str) else None
        started = time.perf_counter()
        try:
            if handler is None:
                raise ProtocolError(f"unknown op {op!r}; known ops: {', '.join(sorted(OPS))}")
            if self.namespace is None and op not in (Op.HELLO, Op.PING):
                raise ProtocolError(f"op {op!r} before hello; send hello first")
            result = handler(self, message)
        except VersionMismatch as exc:
            self._fail(request_id, exc)
            return
        except MeshKVError as exc:
            if isinstance(exc, ProtocolError):
                self._counters.protocol_errors += 1
            self._send(error_reply(request_id, exc))
            self._record(op, started)
            return
        except ValueError as exc:  # the store refused an argument (e.g. a chunk too large)
            self._send(error_reply(request_id, StoreError(f"{op}: {exc}")))
            return
        except Exception as exc:
            logger.exception("local op %r failed", op)
            self._send(error_reply(request_id, MeshKVError(f"internal error in {op}: {exc}")))
            return
        if isinstance(result, dict):
            result["id"] = request_id
            self._send(result)
            self._record(op, started)
        else:
            self._spawn(request_id, str(op), result, started)

    def _spawn(self, request_id: int, op: str, work: Awaitable[Reply], started: float) -> None:
        task = asyncio.ensure_future(self._finish(request_id, op, work, started))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        if len(self.tasks) >= MAX_INFLIGHT_PER_CONN and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self._paused and len(self.tasks) < MAX_INFLIGHT_PER_CONN and self.transport:
            self.transport.resume_reading()
            self._paused = False

    async def _finish(
        self, request_id: int, op: str, work: Awaitable[Reply], started: float
    ) -> None:
        try:
            reply = await work
        except MeshKVError as exc:
            reply = error_reply(request_id, exc)
        except ValueError as exc:
            reply = error_reply(request_id, StoreError(f"{op}: {exc}"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("local op %r failed", op)
            reply = error_reply(request_id, MeshKVError(f"internal error in {op}: {exc}"))
        reply["id"] = request_id
        self._send(reply)
        self._record(op, started)

    def _record(self, op: object, started: float) -> None:
        observe = self._observe.get(op)  # type: ignore[call-overload]
        if observe is not None:
            observe(time.perf_counter() - started)

    def _send(self, reply: Reply) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode(reply))

    def _fail(self, request_id: int | None, exc: MeshKVError) -> None:
        """Reply with ``exc`` and close this connection (the stream is unusable)."""
        self._counters.protocol_errors += 1
        logger.info("closing local connection %d: %s", self.conn_id, exc)
        self._send(error_reply(request_id, exc))
        self.close()

    # --- ops ----------------------------------------------------------------------

    def _hello(self, message: dict[str, Any]) -> Reply:
        version = negotiate(message.get("min_version"), message.get("max_version"))
        fields = message.get("namespace")
        if not isinstance(fields, dict):
            raise ProtocolError("hello: 'namespace' must be a map of Namespace fields")
        try:
            namespace = Namespace(**fields)
        except TypeError as exc:
            raise ConfigError(f"hello: bad namespace fields: {exc}") from exc
        store = self.store
        max_chunk = store.config.max_chunk_bytes
        geometry = {}
        for field in ("chunk_tokens", "chunk_bytes"):
            value = message.get(field)
            if value is None:
                continue
            if type(value) is not int or value <= 0:
                raise ConfigError(f"hello: {field} must be a positive integer, got {value!r}")
            geometry[field] = value
        if geometry.get("chunk_bytes", 0) > max_chunk:
            raise ConfigError(
                f"hello: chunks of {geometry['chunk_bytes']} bytes exceed this agent's largest "
                f"slot ({max_chunk} bytes); use smaller chunks or raise [store.cpu] segment_bytes"
            )
        self.namespace = namespace.digest()
        self.chunk_tokens = geometry.get("chunk_tokens", 0)
        self.server.registry.add(namespace, self.chunk_tokens)
        return {
            "max_chunk_bytes": max_chunk,
            **geometry,
            "version": version,
            "node_id": self.server.config.node_id,
            "arena_name": store.arena_name,
            "arena_size": store.arena_size,
            "namespace": self.namespace,
            "agent_version": __version__,
            "max_keys": MAX_KEYS_PER_REQUEST,
        }

    def _ping(self, message: dict[str, Any]) -> Reply:
        return {}

    def _lookup(self, message: dict[str, Any]) -> Reply | Awaitable[Reply]:
        ns = self.namespace
        assert ns is not None
        keys = parse_keys(message)
        transfer = parse_transfer_hint(message.get("transfer"))
        probe = message.get("probe", False)
        if type(probe) is not bool:
            raise ProtocolError(f"lookup: 'probe' must be true or false, got {probe!r}")
        others = parse_rank_keys(message.get("ranks"), len(keys))
        tiers = self.store.lookup(ns, keys)
        if others:
            return self._lookup_ranks(ns, keys, tiers, others, transfer, message, probe)
        if transfer is not None:  # the puller answers the producer even when all is local
            return self._lookup_remote(ns, keys, tiers, transfer, message.get("budget"), probe)
        if None in tiers:
            puller = self.server.puller
            puller.fill_in_flight(keys, tiers)
            if None in tiers and puller.has_source:
                return self._lookup_remote(ns, keys, tiers, None, message.get("budget"), probe)
        return self._lookup_reply(ns, keys, tiers, probe=probe)

    def _lookup_limit(self, budget: object) -> float:
        limit = self.server.config.remote_lookup_timeout_s
        if isinstance(budget, int | float) and not isinstance(budget, bool) and budget > 0:
            limit = min(limit, budget * LOOKUP_BUDGET_SHARE)
        return limit

    async def _lookup_remote(
        self,
        ns: NamespaceId,
        keys: list[ChunkKey],
        tiers: list[Tier | None],
        transfer: TransferHint | None,
        budget: object,
        probe: bool,
    ) -> Reply:
        loop = asyncio.get_running_loop()
        limit = self._lookup_limit(budget)
        tiers = await self.server.puller.locate(ns, keys, tiers, loop.time() + limit, transfer)
        return self._lookup_reply(ns, keys, tiers, started=False, probe=probe)

    def _lookup_ranks(
        self,
        ns: NamespaceId,
        keys: list[ChunkKey],
        tiers: list[Tier | None],
        others: list[tuple[NamespaceId, list[ChunkKey]]],
        transfer: TransferHint | None,
        message: dict[str, Any],
        probe: bool,
    ) -> Reply | Awaitable[Reply]:
        """A tensor-parallel engine's lookup: ``keys`` are rank 0's, ``others`` the other
        ranks' keys for the same positions. A position counts only where every rank's chunk
        is (the engine loads all ranks or none), and every rank's chunks are promoted,
        pulled or awaited, not rank 0's alone."""
        store, puller = self.store, self.server.puller
        ranks = [(ns, keys, tiers)]
        ranks += [(r_ns, r_keys, store.peek(r_ns, r_keys)) for r_ns, r_keys in others]
        for _, r_keys, r_tiers in ranks:
            puller.fill_in_flight(r_keys, r_tiers)
        if transfer is None and not (
            puller.has_source and any(None in r_tiers for _, _, r_tiers in ranks)
        ):
            combined = combine_tiers([r_tiers for _, _, r_tiers in ranks])
            prefix = prefix_length(combined)
            for r_ns, r_keys, r_tiers in ranks[1:]:
                head = r_tiers[:prefix]
                if head.count(Tier.CPU) != prefix:  # something to promote or await
                    puller.start_local(r_ns, r_keys[:prefix], head)
            return self._lookup_reply(ns, keys, combined, probe=probe, own=tiers)

        async def remote() -> Reply:
            deadline = asyncio.get_running_loop().time() + self._lookup_limit(message.get("budget"))
            combined = await puller.locate_ranks(ranks, deadline, transfer)
            return self._lookup_reply(ns, keys, combined, started=False, probe=probe)

        return remote()

    def _lookup_reply(
        self,
        ns: NamespaceId,
        keys: list[ChunkKey],
        tiers: list[Tier | None],
        *,
        started: bool = True,
        probe: bool = False,
        own: list[Tier | None] | None = None,
    ) -> Reply:
        """``tiers``: the answer (for a tensor-parallel lookup, every rank's combined);
        ``own``: where ``keys`` themselves are, when that differs (the flights this starts
        are for ``keys``)."""
        # Hot path (measured, 64 keys): list.count and handing the StrEnum members to
        # msgpack as they are cost ~7 µs, where per-key loops and `.value` cost ~37 µs.
        prefix = prefix_length(tiers)
        mine = tiers if own is None else own
        if probe:
            # Alternative keys for one position (a partial chunk cut at each block): not a
            # request's chunks, so not counted as lookups, hits or misses.
            head = mine[:prefix]
            if started and head.count(Tier.CPU) != prefix:
                self.server.puller.start_local(ns, keys[:prefix], head)
            return {"prefix": prefix, "tiers": tiers}
        counters = self._counters
        counters.lookups += 1
        counters.miss_chunks += len(tiers) - prefix
        head = tiers[:prefix] if prefix < len(tiers) else tiers
        in_cpu = head.count(Tier.CPU)
        per_chunk = self.chunk_tokens
        counters.hit_chunks["cpu"] += in_cpu
        if per_chunk:
            counters.hit_tokens["cpu"] += in_cpu * per_chunk
            counters.miss_tokens += (len(tiers) - prefix) * per_chunk
        if in_cpu != prefix:
            for tier in (Tier.SSD, Tier.PEER, Tier.REMOTE):
                n = head.count(tier)
                counters.hit_chunks[tier] += n
                counters.hit_tokens[tier] += n * per_chunk
            if started:  # (locate started the flights itself)
                self.server.puller.start_local(ns, keys[:prefix], list(mine[:prefix]))
        return {"prefix": prefix, "tiers": tiers}

    def _reserve(self, message: dict[str, Any]) -> Reply:
        ns = self.namespace
        assert ns is not None
        keys = parse_keys(message)
        sizes = parse_ints(message, "sizes", len(keys), minimum=1)
        partial = message.get("partial", False)
        if type(partial) is not bool:
            raise ProtocolError(f"reserve: 'partial' must be true or false, got {partial!r}")
        store, owner = self.store, self.conn_id
        slots: list[list[int] | None] = []
        done: list[ChunkKey] = []
        try:
            for key, size in zip(keys, sizes, strict=True):
                try:
                    slot = store.reserve(ns, key, size, owner)
                except NoSpace:
                    if not partial:
                        self._counters.reserve_unplaced += len(keys)
                        raise
                    # Keep what fits: the keys come in prompt order, so the slots kept
                    # are the front of each prompt. The rest are not tried: each would
                    # walk the whole eviction order again, and a chunk after a missing
                    # one of its prompt could never be hit.
                    unplaced = len(keys) - len(slots)
                    slots.extend([None] * unplaced)
                    self._counters.reserve_unplaced += unplaced
                    return {"slots": slots, "unplaced": unplaced}
                if slot is None:
                    slots.append(None)
                else:
                    done.append(key)
                    slots.append([slot.offset, slot.length])
        except BaseException:
            # All or nothing (unless ``partial``): a batch that cannot be reserved whole
            # keeps no slots.
            for key in done:
                with contextlib.suppress(MeshKVError):
                    store.abort(ns, key, owner)
            raise
        return {"slots": slots, "unplaced": 0} if partial else {"slots": slots}

    def _commit(self, message: dict[str, Any]) -> Reply:
        ns = self.namespace
        assert ns is not None
        keys = parse_keys(message)
        tokens = parse_ints(message, "tokens", len(keys))
        checksums = parse_optional_ints(message, "checksums", len(keys))
        store, owner = self.store, self.conn_id
        failed: list[str] = []
        for i, key in enumerate(keys):
            try:
                store.commit(ns, key, owner, tokens[i], checksums[i])
            except NotReserved as exc:  # the others still land: each is its own chunk
                failed.append(f"key {i}: {exc}")
        if failed:
            raise NotReserved(
                f"{len(failed)} of {len(keys)} keys not committed (the rest were): "
                + "; ".join(failed[:4])
                + (" ..." if len(failed) > 4 else "")
            )
        return {}

    def _hold(self, message: dict[str, Any]) -> Reply:
        """Pin a prefill/decode transfer's chunks (and push them to the decode node)."""
        ns = self.namespace
        assert ns is not None
        keys = parse_keys(message)
        hold = parse_transfer_hold(message.get("transfer"))
        if hold is None:
            raise ProtocolError("hold needs 'transfer': {id, hold, push_to}")
        transfers = self.server.transfers
        if transfers is None:
            raise ProtocolError("this agent keeps no prefill/decode transfers")
        transfer_id, hold_s, push_to = hold
        held = transfers.hold(ns, keys, transfer_id, hold_s, push_to)
        return {"held": held}

    def _transfers(self, message: dict[str, Any]) -> Reply:
        """The decode side's engine still waits for some transfers (``renew``: ask their
        producers to hold them ``renew_s`` more) and dropped others before loading them
        (``abandon``: their producers may let go now)."""
        renew = parse_transfer_refs(message.get("renew", []), "renew")
        abandon = parse_transfer_refs(message.get("abandon", []), "abandon")
        seconds = message.get("renew_s", 0)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ProtocolError(f"transfers 'renew_s' must be a number of seconds, got {seconds!r}")
        if renew and not 0 < seconds <= MAX_TRANSFER_S:
            raise ProtocolError(
                f"transfers 'renew_s' must be in (0, {MAX_TRANSFER_S:g}] seconds, got {seconds!r}"
            )
        puller = self.server.puller
        by_producer: dict[str, list[str]] = {}
        for producer, transfer_id in renew:
            by_producer.setdefault(producer, []).append(transfer_id)
        for producer, ids in by_producer.items():
            puller.renew_transfers(producer, ids, float(seconds))
        for producer, transfer_id in abandon:
            puller.abandon_transfer(producer, transfer_id)
        return {"renewed": len(renew), "abandoned": len(abandon)}

    def _abort(self, message: dict[str, Any]) -> Reply:
        ns = self.namespace
        assert ns is not None
        for key in parse_keys(message):
            self.store.abort(ns, key, self.conn_id)
        return {}

    def _read(self, message: dict[str, Any]) -> Awaitable[Reply]:
        keys = parse_keys(message)
        wait = parse_float(message, "wait", 0.0, MAX_READ_WAIT_S)
        verify = message.get("verify")
        if verify is not None and not isinstance(verify, bool):
            raise ProtocolError("read: 'verify' must be true or false")
        budget = message.get("budget")
        ssd_wait = None
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0:
                raise ProtocolError(f"read: 'budget' must be a positive number, got {budget!r}")
            ssd_wait = wait + min(float(budget), MAX_READ_WAIT_S) * LOOKUP_BUDGET_SHARE
        return self._read_async(keys, wait, verify, ssd_wait)

    async def _read_async(
        self, keys: list[ChunkKey], wait: float, verify: bool | None, ssd_wait: float | None
    ) -> Reply:
        ns = self.namespace
        assert ns is not None
        store, owner, lease_s = self.store, self.conn_id, self.server.config.lease_seconds
        # Pin what is in memory before waiting for the rest, and each of the rest as it
        # arrives: while a slow disk promotes them, promotions and saves of other requests
        # evict whatever is not pinned, and a request's first missing chunk makes the
        # engine compute everything after it (seen on a disk throttled to 84 MB/s: whole
        # requests recomputed, 39-83 chunks a run).
        guards: list[Pin] = []
        waiting = True

        def guard(key: ChunkKey) -> None:
            if not waiting:
                return  # arrived after the read answered
            with contextlib.suppress(NoSpace):  # out of leases: the read itself will say so
                pin = store.pin_now(ns, key, owner, lease_s)
                if pin is not None:
                    guards.append(pin)

        try:
            for key in keys:
                guard(key)
            if len(guards) < len(keys):
                await self.server.puller.resident(
                    ns, keys, wait, ssd_wait=ssd_wait, on_resident=guard
                )
            waiting = False
            pins = await store.read(ns, keys, owner, lease_s, verify=verify)
        finally:
            waiting = False
            with contextlib.suppress(NotPinned):  # released already if the caller left
                store.release([g.lease_id for g in guards], owner)
        if self.transport is None:  # the caller left while we waited; give the pins back
            store.release([p.lease_id for p in pins if p is not None], owner)
            return {}
        leases = [
            None
            if p is None
            else [p.lease_id, p.slot.offset, p.slot.length, p.num_tokens, p.checksum]
            for p in pins
        ]
        return {"leases": leases}

    def _release(self, message: dict[str, Any]) -> Reply:
        ids = message.get("leases")
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise ProtocolError("'leases' must be a list of lease ids")
        if len(ids) > MAX_KEYS_PER_REQUEST:
            raise ProtocolError(
                f"{len(ids)} leases in one request; the limit is {MAX_KEYS_PER_REQUEST}"
            )
        self.store.release(ids, self.conn_id)
        return {}

    def _stats(self, message: dict[str, Any]) -> Reply:
        return {"stats": plain(self.store.snapshot())}


_HANDLERS: dict[str, Handler] = {
    Op.HELLO: _Connection._hello,
    Op.PING: _Connection._ping,
    Op.LOOKUP: _Connection._lookup,
    Op.RESERVE: _Connection._reserve,
    Op.COMMIT: _Connection._commit,
    Op.ABORT: _Connection._abort,
    Op.READ: _Connection._read,
    Op.RELEASE: _Connection._release,
    Op.STATS: _Connection._stats,
    Op.HOLD: _Connection._hold,
    Op.TRANSFERS: _Connection._transfers,
}
"""Each op's handler, as plain functions of the connection: a table of bound methods on
the connection itself held it in a reference cycle, so every closed connection waited
for a full cycle collection, which a long-lived agent runs seldom (the soak's steady
agent most likely released 5.3 MiB of them at once, after ~17 minutes)."""


def plain(value: Any) -> Any:
    """A snapshot as msgpack/JSON-friendly builtins (dataclasses → dicts, enums → values)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(plain(k)): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


MAX_TP_RANKS = 64
"""Ranks one lookup may name (tensor-parallel sizes in use are 1-16)."""


def parse_rank_keys(value: object, count: int) -> list[tuple[NamespaceId, list[ChunkKey]]]:
    """A lookup's ``ranks`` field: the other tensor-parallel ranks' ``[namespace id, keys]``,
    each with one key per position of the lookup's own ``keys``."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_TP_RANKS:
        raise ProtocolError(
            f"lookup: 'ranks' must be a list of at most {MAX_TP_RANKS} [namespace, keys] pairs"
        )
    out = []
    for r, item in enumerate(value, start=1):
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise ProtocolError(f"lookup: ranks[{r - 1}] must be a [namespace, keys] pair")
        ns, keys = item
        if type(ns) is not bytes or len(ns) != KEY_BYTES:
            raise ProtocolError(
                f"lookup: ranks[{r - 1}]'s namespace must be a {KEY_BYTES}-byte namespace id"
            )
        field = f"ranks[{r - 1}] keys"
        parsed = parse_keys({field: keys}, field)
        if len(parsed) != count:
            raise ProtocolError(
                f"lookup: ranks[{r - 1}] has {len(parsed)} keys; one per key of 'keys' "
                f"({count}) expected"
            )
        out.append((NamespaceId(ns), parsed))
    return out
