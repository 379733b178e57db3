"""``AgentClient``: the blocking client engines use to reach their node's agent.

The vLLM scheduler and workers call from plain threads, so the client is synchronous and
thread-safe (one lock per client, one request in flight per connection). Control goes
over the Unix socket; data goes through the agent's shared-memory arena, which the client
maps read-write after ``hello``: ``reserve`` hands out writable memoryviews into slots,
``read`` hands out views of pinned chunks. Every call is bounded by ``timeout``.

No fate-sharing: a client with no agent raises ``AgentUnavailable`` at once (connecting to
a missing socket fails immediately), a hung agent raises ``DeadlineExceeded`` after
``timeout``. After an agent restart the next call reconnects, says hello again and maps
the new arena (its name changes on every start); reservations and leases held on the old
agent are gone with it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from meshkv import __version__
from meshkv.chunk import KEY_BYTES, ChunkKey, Namespace, NamespaceId, payload_checksum
from meshkv.errors import (
    AgentUnavailable,
    ChecksumMismatch,
    DeadlineExceeded,
    MeshKVError,
    ProtocolError,
    error_from_code,
)
from meshkv.protocol import (
    LENGTH_PREFIX,
    MAX_FRAME_BYTES,
    PREFIX_BYTES,
    PROTOCOL_MAX_VERSION,
    PROTOCOL_MIN_VERSION,
    Op,
    decode_body,
    encode,
)
from meshkv.tiers.arena import Arena

logger = logging.getLogger(__name__)

RECV_CHUNK_BYTES = 64 << 10
"""Bytes asked for per ``recv``: a typical reply (a 64-key lookup or read) in one call."""

DEFAULT_NAMESPACE = Namespace(model="default")
"""Namespace used when the caller names none (tests, ``put``/``get`` scripts)."""

# Ops that may be retried once on a fresh connection when the old one turned out dead:
# they change nothing, or what they changed died with the old agent anyway.
_RETRYABLE = frozenset({Op.HELLO, Op.PING, Op.LOOKUP, Op.READ, Op.STATS})
_RETRYABLE_ON_NEW_AGENT = frozenset({Op.RESERVE})


ArenaHooks = tuple[Callable[[memoryview], None], Callable[[memoryview], None]]
"""``(on_map, on_unmap)`` for the shared arena's mapping (see ``AgentClient``)."""


@dataclass(frozen=True, slots=True)
class HelloInfo:
    """What the agent said at ``hello``."""

    version: int
    """Negotiated local-protocol version."""
    node_id: str
    arena_name: str
    arena_size: int
    namespace: NamespaceId
    """Digest the agent computed for this client's namespace."""
    agent_version: str
    max_chunk_bytes: int
    """Largest chunk the agent's arena accepts."""


@dataclass(frozen=True, slots=True)
class LookupReply:
    """Where the chunks of a request are."""

    prefix: int
    """Chunks in the longest prefix stored somewhere (local tier or peer)."""
    tiers: list[str | None]
    """Per key: ``"cpu"``, ``"ssd"``, ``"peer"`` or None."""


@dataclass(frozen=True, slots=True)
class TransferRef:
    """A lookup of a prefill/decode transfer's chunks (the decode side)."""

    transfer_id: str
    producer: str
    """Node id of the producer's agent."""
    wait_s: float
    """How long the agent may keep pulling before the engine recomputes."""


@dataclass(frozen=True, slots=True)
class TransferHold:
    """A prefill/decode transfer's chunks to keep for the decode side (the prefill side)."""

    transfer_id: str
    hold_s: float
    """How long the agent keeps them pinned if the consumer never says it is done."""
    push_to: str | None = None
    """Node id of the decode side's agent, to push the chunks to as they commit."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """A reserved arena slot: write the payload into ``view``, then ``commit``."""

    key: ChunkKey
    offset: int
    view: memoryview


class Reserved(list[Reservation | None]):
    """The answer of :meth:`AgentClient.reserve`: per key a ``Reservation``, or None when
    the key is already stored (or being stored) — or, for the last ``unplaced`` keys of a
    ``partial`` reserve, when the CPU tier had no room for them."""

    unplaced: int = 0


@dataclass(frozen=True, slots=True)
class Lease:
    """A pinned chunk: read ``view`` and ``release`` it before the lease expires."""

    lease_id: int
    key: ChunkKey
    offset: int
    view: memoryview
    num_tokens: int
    checksum: int | None


class AgentClient:
    """Blocking, thread-safe client of the local agent (see the module docstring)."""

    def __init__(
        self,
        socket_path: str,
        *,
        namespace: Namespace | None = None,
        timeout: float = 2.0,
        chunk_tokens: int | None = None,
        chunk_bytes: int | None = None,
        arena_hooks: ArenaHooks | None = None,
    ) -> None:
        """``chunk_tokens``/``chunk_bytes`` (optional) are checked by the agent at hello:
        a chunk larger than its largest slot fails there with a clear ``ConfigError``.
        ``arena_hooks``: ``(on_map, on_unmap)`` called with the arena's view right after it
        is mapped and right before it is unmapped (e.g. to page-lock it for a GPU)."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.chunk_tokens = chunk_tokens
        self.chunk_bytes = chunk_bytes
        self.socket_path = socket_path
        self.namespace = namespace or DEFAULT_NAMESPACE
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._info: HelloInfo | None = None
        self._arena: Arena | None = None
        self._arena_view: memoryview | None = None
        self._arena_hooks = arena_hooks
        self._next_id = 1
        self._rbuf = bytearray()  # received bytes not yet parsed (at most a few frames)
        self._chunk = bytearray(RECV_CHUNK_BYTES)
        self._closed = False

    # --- lifecycle ----------------------------------------------------------------

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drop the connection (the agent releases this client's pins) and the arena map."""
        with self._lock:
            self._closed = True
            self._disconnect()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # --- convenience --------------------------------------------------------------

    def put(self, key: bytes, data: bytes | bytearray | memoryview, num_tokens: int = 0) -> bool:
        """Store one chunk; False if the agent already has it."""
        payload = memoryview(data).cast("B")
        (res,) = self.reserve([key], [payload.nbytes])
        if res is None:
            return False
        try:
            res.view[:] = payload
            self.commit([key], [num_tokens], checksums=[payload_checksum(payload)])
        except BaseException:
            self._abort_quietly([key])
            raise
        return True

    def get(self, key: bytes) -> bytes | None:
        """A copy of one chunk's payload (checksum-verified), or None if not stored."""
        (lease,) = self.read([key])
        if lease is None:
            return None
        try:
            data = bytes(lease.view)
        finally:
            self.release([lease])
        if lease.checksum is not None and payload_checksum(data) != lease.checksum:
            raise ChecksumMismatch(f"chunk {key.hex()} does not match its checksum")
        return data

    # --- the protocol -------------------------------------------------------------

    def hello(self) -> HelloInfo:
        """Connect if needed and return what the agent said at hello."""
        with self._lock:
            deadline = time.monotonic() + self.timeout
            self._ensure_connected(deadline)
            assert self._info is not None
            return self._info

    def map_arena(self) -> None:
        """Connect and map the arena now (e.g. at worker start-up) rather than on the
        first ``reserve``/``read``."""
        with self._lock:
            self._ensure_connected(time.monotonic() + self.timeout)
            self._arena_buffer()

    def ping(self) -> None:
        self._call(Op.PING, {})

    def lookup(
        self,
        keys: Sequence[bytes],
        *,
        transfer: TransferRef | None = None,
        probe: bool = False,
        ranks: Sequence[tuple[bytes, Sequence[bytes]]] = (),
    ) -> LookupReply:
        """Longest stored prefix and the tier of each key; also starts SSD/peer pulls.

        The agent answers within half of this client's timeout (it spends at most that
        asking the mesh), so a slow mesh never looks like a dead agent. ``transfer``:
        the chunks come from a prefill/decode transfer's producer (pulled from it, or
        pushed here by it), so they count as ``peer`` without asking the directory.
        ``probe``: the keys are alternatives for one position (a partial chunk cut at each
        block), not a request's chunks; the agent does not count them in its lookup
        metrics. ``ranks``: a tensor-parallel engine's other ranks, ``(namespace id, keys)``
        with one key per position of ``keys``: a position then counts only where every
        rank's chunk is, and the agent brings every rank's chunks (an older agent ignores
        the field and answers for ``keys`` alone)."""
        fields: dict[str, Any] = {"keys": _keys(keys), "budget": self.timeout}
        if probe:
            fields["probe"] = True
        if ranks:
            fields["ranks"] = [[bytes(ns), _keys(rank_keys)] for ns, rank_keys in ranks]
        if transfer is not None:
            fields["transfer"] = {
                "id": transfer.transfer_id,
                "producer": transfer.producer,
                "wait": transfer.wait_s,
            }
        reply = self._call(Op.LOOKUP, fields)
        return LookupReply(prefix=reply["prefix"], tiers=reply["tiers"])

    def reserve(
        self,
        keys: Sequence[bytes],
        sizes: Sequence[int],
        *,
        budget: float | None = None,
        partial: bool = False,
    ) -> Reserved:
        """Reserve one slot per key (None: the agent already stores that key). ``budget``:
        this call's deadline in seconds (default: the client's timeout).

        All or nothing by default: ``NoSpace`` when one key finds no room. ``partial``:
        keep the slots of the keys before the first that finds no room; that key and the
        rest come back None and are counted in the answer's ``unplaced``."""
        if len(keys) != len(sizes):
            raise ValueError("reserve: one size per key")
        fields: dict[str, Any] = {"keys": _keys(keys), "sizes": list(sizes)}
        if partial:
            fields["partial"] = True
        with self._lock:
            reply = self._call_locked(Op.RESERVE, fields, budget)
            arena = self._arena_buffer()
            out = Reserved()
            unplaced = reply.get("unplaced", 0)  # absent: all or nothing (an older agent)
            if type(unplaced) is not int or not 0 <= unplaced <= len(keys):
                raise ProtocolError(f"reserve: agent answered unplaced={unplaced!r}")
            out.unplaced = unplaced
            for key, slot in zip(keys, reply["slots"], strict=True):
                if slot is None:
                    out.append(None)
                    continue
                offset, length = slot
                view = arena[offset : offset + length]
                out.append(Reservation(ChunkKey(bytes(key)), offset, view))
            return out

    def commit(
        self,
        keys: Sequence[bytes],
        num_tokens: Sequence[int],
        *,
        checksums: Sequence[int | None] | None = None,
    ) -> None:
        """Make reserved chunks visible. ``checksums`` (xxh3-64) spare the agent the work."""
        message: dict[str, Any] = {"keys": _keys(keys), "tokens": list(num_tokens)}
        if checksums is not None:
            message["checksums"] = list(checksums)
        self._call(Op.COMMIT, message)

    def hold(self, keys: Sequence[bytes], hold: TransferHold) -> int:
        """Pin a prefill/decode transfer's chunks in the agent until the decode side is done
        with them (or ``hold.hold_s`` passes), and push them to ``hold.push_to`` when named.
        Returns how many of ``keys`` were there to pin."""
        reply = self._call(
            Op.HOLD,
            {
                "keys": _keys(keys),
                "transfer": {"id": hold.transfer_id, "hold": hold.hold_s, "push_to": hold.push_to},
            },
        )
        held: int = reply["held"]
        return held

    def transfers(
        self,
        *,
        renew: Sequence[tuple[str, str]] = (),
        abandon: Sequence[tuple[str, str]] = (),
        renew_s: float = 0.0,
    ) -> bool:
        """The decode side of prefill/decode transfers, as ``(producer, transfer id)``
        pairs: ``renew`` those this engine still waits to load (their producers hold them
        ``renew_s`` more), ``abandon`` those it dropped before loading. False when the agent
        is older than local protocol 2 and cannot do it (its producers' holds end at their
        deadlines)."""
        if self.hello().version < 2:
            return False
        self._call(
            Op.TRANSFERS,
            {
                "renew": [list(ref) for ref in renew],
                "abandon": [list(ref) for ref in abandon],
                "renew_s": renew_s,
            },
        )
        return True

    def abort(self, keys: Sequence[bytes]) -> None:
        """Give reserved slots back without committing."""
        self._call(Op.ABORT, {"keys": _keys(keys)})

    def read(
        self, keys: Sequence[bytes], *, wait: float = 0.0, verify: bool | None = None
    ) -> list[Lease | None]:
        """Pin chunks for reading; waits up to ``wait`` s for pulls a lookup started, and
        for promotions from the agent's SSD up to ``wait`` plus half of this client's
        timeout (a chunk still on its way then comes back None: the agent answers before
        this call's deadline however slow its disk is).
        ``verify=True`` makes the agent re-hash each chunk first and drop (not return) any
        whose bytes no longer match its checksum; None: the agent's ``verify_reads``."""
        with self._lock:
            budget = self.timeout + wait
            body: dict[str, Any] = {"keys": _keys(keys), "wait": wait, "budget": self.timeout}
            if verify is not None:
                body["verify"] = verify
            reply = self._call_locked(Op.READ, body, budget)
            arena = self._arena_buffer()
            out: list[Lease | None] = []
            for key, item in zip(keys, reply["leases"], strict=True):
                if item is None:
                    out.append(None)
                    continue
                lease_id, offset, length, num_tokens, checksum = item
                view = arena[offset : offset + length].toreadonly()
                out.append(
                    Lease(lease_id, ChunkKey(bytes(key)), offset, view, num_tokens, checksum)
                )
            return out

    def release(self, leases: Sequence[Lease | int]) -> None:
        """Unpin chunks (a lease released twice is an error: ``NotPinned``)."""
        ids = [x if isinstance(x, int) else x.lease_id for x in leases]
        self._call(Op.RELEASE, {"leases": ids})

    def stats(self) -> dict[str, Any]:
        """The agent's store snapshot (same numbers as ``/v1/status``)."""
        reply = self._call(Op.STATS, {})
        stats: dict[str, Any] = reply["stats"]
        return stats

    # --- plumbing -----------------------------------------------------------------

    def _abort_quietly(self, keys: Sequence[bytes]) -> None:
        try:
            self.abort(keys)
        except MeshKVError as exc:
            logger.debug("abort after a failed put did not reach the agent: %s", exc)

    def _call(self, op: Op, fields: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return self._call_locked(op, fields)

    def _call_locked(
        self, op: Op, fields: dict[str, Any], budget: float | None = None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + (budget if budget is not None else self.timeout)
        before = self._info.arena_name if self._info is not None else None
        fresh = self._ensure_connected(deadline)
        try:
            return self._exchange(op, fields, deadline)
        except AgentUnavailable:
            # The agent went away since our last call. Retry once: ops without effect,
            # and a reserve when another agent answers (restarted: nothing the old one
            # did survives; the arena is new), which a step's saves start with.
            if fresh or op not in _RETRYABLE | _RETRYABLE_ON_NEW_AGENT:
                raise
            self._ensure_connected(deadline)
            if op not in _RETRYABLE and (self._info is None or self._info.arena_name == before):
                raise
            return self._exchange(op, fields, deadline)

    def _exchange(self, op: Op, fields: dict[str, Any], deadline: float) -> dict[str, Any]:
        sock = self._sock
        assert sock is not None
        request_id = self._next_id
        self._next_id += 1
        fields["op"] = op.value
        fields["id"] = request_id
        frame = encode(fields)
        try:
            sock.settimeout(_remaining(deadline))
            sock.sendall(frame)
            while True:
                reply = self._recv_message(sock, deadline)
                if reply.get("id") == request_id:
                    break
                if reply.get("id") is None and "error" in reply:
                    break  # connection-level error (the agent closes after it)
                # A late reply to a call that timed out earlier: skip it.
        except TimeoutError as exc:
            self._disconnect()
            raise DeadlineExceeded(
                f"agent at {self.socket_path} did not answer {op.value} within the deadline"
            ) from exc
        except OSError as exc:
            self._disconnect()
            raise AgentUnavailable(f"agent at {self.socket_path} went away: {exc}") from exc
        except ProtocolError:
            self._disconnect()  # the stream is out of step; start afresh next call
            raise
        error = reply.get("error")
        if error is not None:
            if reply.get("id") is None:
                self._disconnect()
            raise error_from_code(str(error.get("code")), str(error.get("message")))
        return reply

    def _recv_message(self, sock: socket.socket, deadline: float) -> dict[str, Any]:
        # One recv usually brings a whole reply (length prefix and body): half the system
        # calls of reading the prefix and the body separately (each recv with a timeout is
        # a poll plus a recv). Bytes past the frame stay in _rbuf for the next call.
        buf = self._rbuf
        while len(buf) < PREFIX_BYTES:
            self._recv_some(sock, deadline)
        (size,) = LENGTH_PREFIX.unpack_from(buf, 0)
        if size > MAX_FRAME_BYTES:
            raise ProtocolError(f"agent sent a {size}-byte frame (limit {MAX_FRAME_BYTES})")
        end = PREFIX_BYTES + size
        while len(buf) < end:
            self._recv_some(sock, deadline)
        body = buf[PREFIX_BYTES:end]  # a copy: buf is trimmed next
        del buf[:end]
        return decode_body(body)

    def _recv_some(self, sock: socket.socket, deadline: float) -> None:
        sock.settimeout(_remaining(deadline))
        n = sock.recv_into(self._chunk)
        if n == 0:
            raise ConnectionResetError("agent closed the connection")
        self._rbuf += memoryview(self._chunk)[:n]

    def _ensure_connected(self, deadline: float) -> bool:
        """Connect + hello unless connected; True if it connected now."""
        if self._closed:
            raise AgentUnavailable("client is closed")
        if self._sock is not None:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(self.socket_path)
        except TimeoutError as exc:
            sock.close()
            raise AgentUnavailable(f"agent at {self.socket_path} did not accept in time") from exc
        except OSError as exc:
            sock.close()
            reason = exc.strerror or exc  # "AF_UNIX path too long" has no strerror
            raise AgentUnavailable(f"no agent at {self.socket_path}: {reason}") from exc
        self._sock = sock
        try:
            reply = self._exchange(Op.HELLO, self._hello_fields(), deadline)
            self._info = HelloInfo(
                version=reply["version"],
                node_id=reply["node_id"],
                arena_name=reply["arena_name"],
                arena_size=reply["arena_size"],
                namespace=NamespaceId(reply["namespace"]),
                agent_version=reply["agent_version"],
                max_chunk_bytes=reply["max_chunk_bytes"],
            )
        except DeadlineExceeded as exc:
            self._disconnect()
            raise AgentUnavailable(f"agent at {self.socket_path} did not say hello") from exc
        except BaseException:
            self._disconnect()
            raise
        return True

    def _hello_fields(self) -> dict[str, Any]:
        ns = self.namespace
        return {
            "min_version": PROTOCOL_MIN_VERSION,
            "max_version": PROTOCOL_MAX_VERSION,
            "namespace": dataclasses.asdict(ns),
            "client": f"meshkv-client/{__version__} pid={os.getpid()}",
            "chunk_tokens": self.chunk_tokens,
            "chunk_bytes": self.chunk_bytes,
        }

    def _arena_buffer(self) -> memoryview:
        """The arena, mapped on first use: a process that only looks up (the vLLM
        scheduler) never maps it. Arena.attach maps with MAP_POPULATE, so page tables are
        filled once (measured ~0.25 s per GiB) rather than by a fault per page in the hot
        path."""
        if self._arena_view is None:
            assert self._info is not None
            try:
                self._map_arena(self._info)
            except BaseException:
                self._disconnect()  # the agent drops what this connection reserved/pinned
                raise
            assert self._arena_view is not None
        return self._arena_view

    def _map_arena(self, info: HelloInfo) -> None:
        try:
            self._arena = SHARED_ARENAS.acquire(info.arena_name)
        except OSError as exc:
            raise AgentUnavailable(
                f"cannot map the agent's arena {info.arena_name}: {exc.strerror}"
            ) from exc
        if self._arena.size < info.arena_size:
            raise AgentUnavailable(f"arena {info.arena_name} is smaller than the agent says")
        self._arena_view = self._arena.buffer
        if self._arena_hooks is not None:
            self._arena_hooks[0](self._arena_view)

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._rbuf.clear()  # a partial frame of the old connection must not leak into the next
        self._info = None
        if self._arena_view is not None and self._arena_hooks is not None:
            self._arena_hooks[1](self._arena_view)
        self._arena_view = None
        if self._arena is not None:
            # The last client of the mapping unmaps it; callers may still hold views of old
            # slots, and then the mapping goes with them.
            SHARED_ARENAS.release(self._arena)
            self._arena = None


class SharedArenas:
    """One mapping of each agent arena per process, shared by the process's clients
    (refcounted). An engine worker has a client per load lane and one for saves: each
    mapped the whole arena before, with ``MAP_POPULATE`` (~0.25 s per GiB, and page
    tables for every mapping), lazily, inside its first call's deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[Arena, int]] = {}

    def acquire(self, name: str) -> Arena:
        """The process's mapping of arena ``name``, mapped now if no client holds it.
        Under the lock: a second client waits for the first one's mapping, not a second."""
        with self._lock:
            held = self._held.get(name)
            if held is not None:
                arena, users = held
                self._held[name] = (arena, users + 1)
                return arena
            arena = Arena.attach(name)
            self._held[name] = (arena, 1)
            return arena

    def release(self, arena: Arena) -> None:
        """A client is done with ``arena``; the last one unmaps it."""
        with self._lock:
            held = self._held.get(arena.name)
            if held is not None and held[0] is arena:
                users = held[1] - 1
                if users:
                    self._held[arena.name] = (arena, users)
                    return
                del self._held[arena.name]
        arena.close()

    def users(self, name: str) -> int:
        """Clients holding the mapping of arena ``name`` (0: not mapped)."""
        with self._lock:
            held = self._held.get(name)
            return 0 if held is None else held[1]


SHARED_ARENAS = SharedArenas()


def _keys(keys: Sequence[bytes]) -> list[bytes]:
    out = [bytes(k) for k in keys]
    for i, key in enumerate(out):
        if len(key) != KEY_BYTES:
            raise ValueError(f"key {i} is {len(key)} bytes; keys are {KEY_BYTES} bytes")
    return out


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left
