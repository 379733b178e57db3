"""Decode requests that wait in the engine's queue before vLLM looks at them: their
prefill/decode transfers are renewed at the producer, or abandoned when they end there.

vLLM does not look at a waiting request while every running slot is taken, so under a
surge of decode traffic nothing pulls such a request's transfer, and the producer's hold
(``transfer_hold_s``) could end before the request runs. As NIXL's decode side renews its
lease by heartbeat, ``QueuedTransfers`` tracks every request that arrives with meshkv
transfer parameters (vLLM's ``on_new_request``) until vLLM first looks at it, and asks the
agent every ``transfer_renew_s`` (the first time within half of what the hold has left) to
renew the hold for three times that. A request that ends in the queue, or whose transfer
turns out unusable, abandons it: the producer releases it at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from meshkv.errors import AgentUnavailable, MeshKVError

from .stats import ConnectorCounters
from .transfer import ConsumerRequest

logger = logging.getLogger(__name__)

RENEW_BATCH = 512
"""Transfers renewed per agent call (a frame stays far below the local protocol's 1 MiB)."""


class TransferAgent(Protocol):
    def transfers(
        self,
        *,
        renew: Sequence[tuple[str, str]] = (),
        abandon: Sequence[tuple[str, str]] = (),
        renew_s: float = 0.0,
    ) -> bool:
        """Renew or abandon producers' holds, as ``(producer, transfer id)`` pairs; False
        when the agent cannot (older than local protocol 2)."""
        ...


@dataclass(slots=True)
class _Queued:
    """A decode request vLLM has not looked at yet, whose producer holds its transfer."""

    ref: tuple[str, str]
    """(producer node id, transfer id)"""
    due: float
    """``time.monotonic()`` of its next renewal."""


class QueuedTransfers:
    """The queued decode requests of one engine's scheduler, by request id."""

    def __init__(self, agent: TransferAgent, counters: ConnectorCounters, renew_s: float) -> None:
        self._agent = agent
        self._counters = counters
        self._renew_s = renew_s
        """0: no renewals (abandons still go)."""
        self._queued: dict[str, _Queued] = {}
        self._next_renewal = float("inf")

    def __bool__(self) -> bool:
        return bool(self._queued)

    def add(self, request_id: str, consumer: ConsumerRequest) -> None:
        """A decode request entered the queue."""
        renew_s = self._renew_s
        left = consumer.expires - time.time()  # the producer's clock: may be off a little
        first = min(renew_s, max(0.5, left / 2)) if renew_s > 0 else float("inf")
        queued = _Queued((consumer.producer, consumer.transfer_id), time.monotonic() + first)
        self._queued[request_id] = queued
        self._next_renewal = min(self._next_renewal, queued.due)

    def looked_at(self, request_id: str, *, used: bool) -> None:
        """vLLM looks at the request: its lookup names the transfer (``used``: the agent
        tells the producer when its pulls end), or it cannot use it (abandoned now)."""
        queued = self._queued.pop(request_id, None)
        if queued is not None and not used:
            self._abandon(queued)

    def finished(self, request_id: str) -> None:
        """The request ended; if still queued (aborted there), the producer may let go."""
        queued = self._queued.pop(request_id, None)
        if queued is not None:
            self._abandon(queued)

    def renew_due(self) -> None:
        """Renew the holds whose renewal is due: nothing unless one is, then one agent
        round trip per ``RENEW_BATCH`` of them."""
        now = time.monotonic()
        if now < self._next_renewal:
            return
        renew_s = self._renew_s
        due = [q for q in self._queued.values() if q.due <= now]
        for q in due:
            q.due = now + renew_s
        self._next_renewal = min((q.due for q in self._queued.values()), default=float("inf"))
        started = time.perf_counter()
        try:
            for i in range(0, len(due), RENEW_BATCH):
                batch = [q.ref for q in due[i : i + RENEW_BATCH]]
                if not self._agent.transfers(renew=batch, renew_s=3 * renew_s):
                    break  # an agent older than local protocol 2
                self._counters.transfer_renewals += len(batch)
        except (AgentUnavailable, MeshKVError) as exc:
            logger.debug("meshkv transfer renewal failed: %s", exc)
        finally:
            self._counters.call_seconds += time.perf_counter() - started

    def clear(self) -> None:
        self._queued.clear()

    def _abandon(self, queued: _Queued) -> None:
        """Tell the producer this engine will not read the transfer."""
        started = time.perf_counter()
        try:
            if self._agent.transfers(abandon=[queued.ref]):
                self._counters.transfers_abandoned += 1
        except (AgentUnavailable, MeshKVError) as exc:
            logger.debug("meshkv: abandoning transfer %s failed: %s", queued.ref[1], exc)
        finally:
            self._counters.call_seconds += time.perf_counter() - started
