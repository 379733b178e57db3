"""The connector's handle on the local agent: deadlines plus a circuit breaker.

No fate-sharing: every call is bounded by the client's deadline. An agent that is gone
(no socket, connection refused or reset) opens the breaker at once: the agent is skipped
for ``retry_interval_s``, so a dead agent costs the engine nothing per request, and the
first call after that retries it (a refused connect costs microseconds). A call that only
missed its deadline is that request's miss; the breaker opens after ``breaker_failures``
of them in a row, or at once when connecting took the whole deadline (a hung agent: the
socket accepts, nothing answers). A hung agent is then probed off the engine's path: a
background thread says hello on a fresh connection every ``retry_interval_s``, and calls
fail fast until it answers, so a frozen agent costs the engine its first deadlines, not
one deadline per retry interval for as long as it stays frozen (a lookup every 10 ms for
4 s against a frozen agent: 0.44 s blocked, against 2.23 s when each retry interval let a
call through; ``tests/vllm/test_agent_link.py``). Any answer closes the breaker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from meshkv.chunk import ChunkKey, Namespace, NamespaceId
from meshkv.errors import (
    AgentUnavailable,
    DeadlineExceeded,
    MeshKVError,
    ProtocolError,
    TransportError,
)

if TYPE_CHECKING:
    import torch

    from meshkv.client import (
        AgentClient,
        ArenaHooks,
        Lease,
        LookupReply,
        Reserved,
        TransferHold,
        TransferRef,
    )

    from .config import ConnectorConfig
    from .stats import ConnectorCounters

logger = logging.getLogger(__name__)
T = TypeVar("T")

WARM_UP_S = 5.0
"""How long the connect at engine start waits for a slow agent's hello."""
_LINK_ERRORS = (AgentUnavailable, TimeoutError, ConnectionError, TransportError, ProtocolError)
"""Errors that mean the agent is gone (or the stream to it is broken): open the breaker."""


class AgentLink:
    """Lazily connected ``AgentClient`` guarded by a retry interval."""

    def __init__(
        self,
        socket_path: str,
        namespace: Namespace,
        timeout: float,
        retry_interval: float,
        counters: ConnectorCounters,
        breaker_failures: int = 3,
        arena_hooks: ArenaHooks | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        self._socket_path = socket_path
        self._arena_hooks = arena_hooks
        self._chunk_tokens = chunk_tokens
        self._namespace = namespace
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._counters = counters
        self._client: AgentClient | None = None
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._breaker_failures = breaker_failures
        self._down_until = 0.0
        self._was_down = False
        self._slow = 0
        """Calls in a row that missed their deadline."""
        self._probe: threading.Thread | None = None
        self._closed = threading.Event()

    def _new_client(self) -> AgentClient:
        from meshkv.client import AgentClient

        return AgentClient(
            self._socket_path,
            namespace=self._namespace,
            timeout=self._timeout,
            arena_hooks=self._arena_hooks,
            chunk_tokens=self._chunk_tokens,
        )

    def _get_client(self) -> AgentClient:
        with self._lock:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def call(self, fn: Callable[[AgentClient], T]) -> T:
        """Run ``fn(client)``; raise ``AgentUnavailable`` fast while the agent is down."""
        if time.monotonic() < self._down_until:
            if self._down_until == float("inf"):
                self._start_probe(None)  # hung: make sure a probe is running (no-op if so)
            self._counters.agent_unavailable += 1
            raise AgentUnavailable("meshkv agent marked down; retrying later")
        started = time.monotonic()
        try:
            result = fn(self._get_client())
        except DeadlineExceeded as exc:
            self._counters.agent_slow += 1
            self._slow += 1
            if self._slow >= self._breaker_failures:
                self._open(exc, hung=True)
            raise AgentUnavailable(str(exc)) from exc
        except _LINK_ERRORS as exc:
            # Connected but no hello within the deadline: hung, not gone.
            self._open(exc, hung=time.monotonic() - started >= 0.5 * self._timeout)
            raise AgentUnavailable(str(exc)) from exc
        except MeshKVError:
            self._slow = 0  # it answered (with an error of the request's own)
            raise
        self._slow = 0
        if self._was_down:
            logger.info("meshkv agent at %s is reachable again", self._socket_path)
            self._was_down = False
        return result

    def _open(self, exc: BaseException, *, hung: bool = False) -> None:
        """Skip the agent for ``retry_interval`` (it is gone), or until the background probe
        hears from it (it is hung)."""
        self._counters.agent_unavailable += 1
        self._slow = 0
        if hung:
            self._down_until = float("inf")
            with self._lock:
                stale, self._client = self._client, None
            self._start_probe(stale)
        else:
            self._down_until = time.monotonic() + self._retry_interval
        if not self._was_down:
            logger.warning(
                "meshkv agent at %s unavailable (%s: %s); serving without it, retry in %.1fs",
                self._socket_path,
                type(exc).__name__,
                exc,
                self._retry_interval,
            )
        self._was_down = True

    def _start_probe(self, stale: AgentClient | None) -> None:
        with self._probe_lock:
            if self._probe is not None and self._probe.is_alive():
                if stale is not None:
                    _close_quietly(stale)
                return
            self._probe = threading.Thread(
                target=self._probe_loop, args=(stale,), name="meshkv-agent-probe", daemon=True
            )
            self._probe.start()

    def _probe_loop(self, stale: AgentClient | None) -> None:
        _close_quietly(stale)  # its stream may be stuck mid-reply: never reuse it
        while not self._closed.wait(self._retry_interval):
            client: AgentClient | None = None
            try:
                client = self._new_client()
                client.hello()
            except Exception as exc:  # the probe must outlive anything one attempt raises
                if not isinstance(exc, MeshKVError | OSError):
                    logger.warning("meshkv agent probe: %r", exc)
                _close_quietly(client)
                continue
            with self._lock:
                if self._closed.is_set():
                    _close_quietly(client)
                    return
                old, self._client = self._client, client
            _close_quietly(old)
            self._down_until = 0.0  # calls go through again
            return

    def warm_up(self, *, map_arena: bool = False) -> bool:
        """Connect now (at engine start) so the first lookup does not pay for the connect
        inside its deadline (``map_arena``: and map the agent's arena, for the paths that
        copy); a missing agent is only logged, like any later outage.

        This is engine start, not a request: a slow agent (starved while the engine's
        workers start beside it on a small host) gets ``WARM_UP_S`` to answer. Counted as
        hung after one call's deadline, it would be skipped until the background probe
        heard from it, and the first requests would find nothing (seen with TP=2 engines
        on vLLM 0.31 here: a decode engine computed a whole transferred prompt)."""
        client = self._new_client()
        client.timeout = max(self._timeout, WARM_UP_S)
        try:
            client.map_arena() if map_arena else client.hello()
        except (MeshKVError, OSError):
            _close_quietly(client)  # gone or hung: the usual path logs it and retries
            try:
                self.call(lambda c: c.map_arena() if map_arena else c.hello())
            except MeshKVError:
                return False
            return True
        client.timeout = self._timeout
        with self._lock:
            old, self._client = self._client, client
        _close_quietly(old)
        return True

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            client, self._client = self._client, None
        _close_quietly(client)


def _close_quietly(client: AgentClient | None) -> None:
    if client is not None:
        try:
            client.close()
        except Exception:  # closing must never take the engine down
            logger.debug("closing the meshkv client failed", exc_info=True)


class SchedulerLink:
    """The scheduler side's agent (``scheduler.SchedulerAgent``): lookups under
    ``lookup_timeout_s``, and the agent's node id for prefill/decode parameters."""

    def __init__(self, cfg: ConnectorConfig, namespace: Namespace, counters: ConnectorCounters):
        # chunk_tokens at hello: the agent then counts hit tokens and can answer prefix
        # queries (``POST /v1/prefix``) for this namespace.
        self._link = AgentLink(
            cfg.socket_path,
            namespace,
            cfg.lookup_timeout_s,
            cfg.retry_interval_s,
            counters,
            cfg.breaker_failures,
            chunk_tokens=cfg.chunk_tokens,
        )

    def warm_up(self) -> bool:
        return self._link.warm_up()

    def lookup(
        self,
        keys: list[ChunkKey],
        transfer: TransferRef | None,
        *,
        probe: bool = False,
        ranks: Sequence[tuple[NamespaceId, list[ChunkKey]]] = (),
    ) -> LookupReply:
        return self._link.call(
            lambda client: client.lookup(keys, transfer=transfer, probe=probe, ranks=ranks)
        )

    def node_id(self) -> str | None:
        try:
            return self._link.call(lambda client: client.hello().node_id)
        except MeshKVError:
            return None

    def transfers(
        self,
        *,
        renew: Sequence[tuple[str, str]] = (),
        abandon: Sequence[tuple[str, str]] = (),
        renew_s: float = 0.0,
    ) -> bool:
        return self._link.call(
            lambda client: client.transfers(renew=renew, abandon=abandon, renew_s=renew_s)
        )

    def close(self) -> None:
        self._link.close()


class WorkerLink:
    """The worker side's agent (``worker.WorkerAgent``). One client per path, so that no
    wait holds a lock another path needs: synchronous loads (lane 0, inside the step), each
    background load lane (they wait for pulls), and saves (the save thread)."""

    def __init__(self, cfg: ConnectorConfig, namespace: Namespace, counters: ConnectorCounters):
        self._pinner = ArenaPinner()
        hooks = (self._pinner.on_map, self._pinner.on_unmap)

        def link() -> AgentLink:
            return AgentLink(
                cfg.socket_path,
                namespace,
                cfg.save_timeout_s,
                cfg.retry_interval_s,
                counters,
                cfg.breaker_failures,
                arena_hooks=hooks,
                # Declared at hello so the agent knows every rank's namespace: a prefix
                # query (cache-aware routing) counts only what all ranks hold.
                chunk_tokens=cfg.chunk_tokens,
            )

        from .worker import LOAD_LANES

        self._lanes = [link() for _ in range(LOAD_LANES + 1)]
        self._saves = link()

    def pin_arenas(self) -> None:
        self._pinner.enabled = True

    def warm_up(self) -> None:
        started = time.perf_counter()
        links = [*self._lanes, self._saves]
        if not all(link.warm_up(map_arena=True) for link in links):
            return  # the agent is not there (logged); the paths connect when it is
        logger.debug(
            "meshkv: %d agent connections and the arena mapping ready in %.2f s",
            len(links), time.perf_counter() - started,
        )  # fmt: skip

    def report_corrupt(self, keys: list[ChunkKey]) -> None:
        def check(client: AgentClient) -> None:
            leases = client.read(keys, verify=True)  # the agent drops what fails
            client.release([lease for lease in leases if lease is not None])

        self._saves.call(check)

    def read(self, keys: list[ChunkKey], wait: float, *, lane: int) -> list[Lease | None]:
        return self._lanes[lane].call(lambda client: client.read(keys, wait=wait))

    def release(self, leases: Sequence[Lease], *, lane: int) -> None:
        self._lanes[lane].call(lambda client: client.release(leases))

    def reserve(
        self, keys: list[ChunkKey], sizes: list[int], budget: float | None = None
    ) -> Reserved:
        """Partial: a step whose last chunks find no room still saves the ones before."""
        return self._saves.call(
            lambda client: client.reserve(keys, sizes, budget=budget, partial=True)
        )

    def commit(self, keys: list[ChunkKey], tokens: list[int], checksums: list[int | None]) -> None:
        self._saves.call(lambda client: client.commit(keys, tokens, checksums=checksums))

    def abort(self, keys: list[ChunkKey]) -> None:
        self._saves.call(lambda client: client.abort(keys))

    def hold(self, keys: list[ChunkKey], hold: TransferHold) -> int:
        return self._saves.call(lambda client: client.hold(keys, hold))

    def close(self) -> None:
        for link in (*self._lanes, self._saves):
            link.close()


class ArenaPinner:
    """Page-locks the process's mapping of the agent's arena (shared by every lane's client,
    so counted: pinned at the first client's map, unpinned at the last one's unmap) once the
    engine's caches turned out to be on a GPU, so the kernels copy straight between device
    blocks and the arena; unpins before a mapping goes (agent restart)."""

    def __init__(self) -> None:
        self.enabled = False
        self._pinned: dict[int, tuple[torch.Tensor | None, int]] = {}
        self._lock = threading.Lock()

    def on_map(self, view: memoryview) -> None:
        if not self.enabled:
            return
        with self._lock:
            held = self._pinned.get(id(view))
            if held is not None:
                self._pinned[id(view)] = (held[0], held[1] + 1)
                return
            from meshkv.kernels import as_byte_tensor, pin_host_memory

            tensor = as_byte_tensor(view)
            if pin_host_memory(tensor):
                self._pinned[id(view)] = (tensor, 1)
            else:
                self._pinned[id(view)] = (None, 1)  # counted, so later clients do not retry
                logger.warning("meshkv: could not page-lock the agent's arena; copies are staged")

    def on_unmap(self, view: memoryview) -> None:
        with self._lock:
            held = self._pinned.get(id(view))
            if held is None:
                return
            tensor, users = held
            if users > 1:
                self._pinned[id(view)] = (tensor, users - 1)
                return
            del self._pinned[id(view)]
        if tensor is not None:
            from meshkv.kernels import unpin_host_memory

            unpin_host_memory(tensor)
