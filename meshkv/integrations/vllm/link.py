"""The connector's handle on the local agent: deadlines plus a circuit breaker.

No fate-sharing: every call is bounded by the client's deadline, and after one failure the
agent is skipped for ``retry_interval_s`` so that a dead agent costs the engine nothing
per request. The ``AgentClient`` reconnects by itself once the agent is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from meshkv.chunk import Namespace
from meshkv.errors import AgentUnavailable, MeshKVError, ProtocolError, TransportError

if TYPE_CHECKING:
    from meshkv.client import AgentClient

    from .stats import ConnectorCounters

logger = logging.getLogger(__name__)
T = TypeVar("T")

_LINK_ERRORS = (AgentUnavailable, TimeoutError, ConnectionError, TransportError, ProtocolError)


class AgentLink:
    """Lazily connected ``AgentClient`` guarded by a retry interval."""

    def __init__(
        self,
        socket_path: str,
        namespace: Namespace,
        timeout: float,
        retry_interval: float,
        counters: ConnectorCounters,
    ) -> None:
        self._socket_path = socket_path
        self._namespace = namespace
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._counters = counters
        self._client: AgentClient | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._was_down = False

    def _get_client(self) -> AgentClient:
        with self._lock:
            if self._client is None:
                from meshkv.client import AgentClient

                self._client = AgentClient(
                    self._socket_path, namespace=self._namespace, timeout=self._timeout
                )
            return self._client

    def call(self, fn: Callable[[AgentClient], T]) -> T:
        """Run ``fn(client)``; raise ``AgentUnavailable`` fast while the agent is down."""
        if time.monotonic() < self._down_until:
            self._counters.agent_unavailable += 1
            raise AgentUnavailable("meshkv agent marked down; retrying later")
        try:
            result = fn(self._get_client())
        except _LINK_ERRORS as exc:
            self._counters.agent_unavailable += 1
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
            raise AgentUnavailable(str(exc)) from exc
        except MeshKVError:
            raise
        if self._was_down:
            logger.info("meshkv agent at %s is reachable again", self._socket_path)
            self._was_down = False
        return result

    def warm_up(self) -> bool:
        """Connect now (at engine start) so the first lookup does not pay for the connect
        inside its deadline; a missing agent is only logged, like any later outage."""
        try:
            self.call(lambda client: client.hello())
        except MeshKVError:
            return False
        return True

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing must never take the engine down
                logger.debug("closing the meshkv client failed", exc_info=True)
