"""``Transfers``: the producer side of prefill/decode transfers.

When a prefill engine commits the chunks of a request that a decode engine will continue
(vLLM's ``do_remote_decode``), its connector names the transfer in the commit. The agent
then pins those chunks under the transfer (so eviction cannot take them before the decode
side has them) and, when the request named a decode node, pushes them there at once. The
pins end when the consumer's agent says it is done (``TRANSFER_DONE`` over the mesh: every
chunk arrived or was given up), or when the hold's deadline passes (a timer gives the pins
back; the store itself never closes a lease), whichever comes first, so nothing leaks if the
decode side never comes.

The hold deadline is the producer's promise: vLLM's NIXL connector keeps the prefill's blocks
for a 30 s lease for the same reason; meshkv holds arena copies, not engine blocks, so the
engine's memory is free the moment the request finishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshkv.chunk import ChunkKey, NamespaceId
from meshkv.errors import MeshKVError
from meshkv.store import Store

logger = logging.getLogger(__name__)

TRANSFER_OWNER = (1 << 62) + 16
"""Store owner of the pins that hold a transfer's chunks."""
MAX_TRANSFERS = 4096
"""Most transfers held at once; the oldest is released beyond it (counted)."""

Pusher = Callable[[NamespaceId, Sequence[ChunkKey], str], None]
"""``push(ns, keys, node)``: copy ``keys`` to ``node`` now (the mesh's pusher)."""


@dataclass(slots=True)
class TransferStats:
    held: int = 0
    """Transfers whose chunks were pinned."""
    chunks_held: int = 0
    missing: int = 0
    """Chunks a transfer named that were not in the arena when it was held."""
    released: int = 0
    """Transfers the consumer declared done."""
    expired: int = 0
    """Transfers dropped at their deadline (the store reclaimed the pins)."""
    evicted: int = 0
    """Transfers released early because ``MAX_TRANSFERS`` were held."""
    pushes: int = 0
    """Transfers whose chunks were pushed to the decode node."""


class Transfers:
    """Holds for prefill/decode transfers on this (producer) node."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._push: Pusher | None = None
        self._held: dict[str, tuple[list[int], float]] = {}
        """transfer id → (lease ids, loop.time() deadline); insertion order = age."""
        self.stats = TransferStats()

    def set_pusher(self, push: Pusher) -> None:
        """Push to decode nodes through ``push`` from now on (the mesh registers it)."""
        self._push = push

    @property
    def open(self) -> int:
        return len(self._held)

    @property
    def pinned(self) -> int:
        return sum(len(ids) for ids, _ in self._held.values())

    def hold(
        self,
        ns: NamespaceId,
        keys: Sequence[ChunkKey],
        transfer_id: str,
        hold_s: float,
        push_to: str | None,
    ) -> int:
        """Pin ``keys`` (just committed) for ``transfer_id`` until the consumer is done or
        ``hold_s`` seconds pass; push them to ``push_to`` when it is given. Returns how
        many were in the arena to pin. A transfer may be held in several calls."""
        store = self._store
        loop = asyncio.get_running_loop()
        self._expire(loop.time())
        ids, deadline = self._held.pop(transfer_id, ([], loop.time() + hold_s))
        before = len(ids)
        for key in keys:
            pin = store.pin_now(ns, key, TRANSFER_OWNER, max(0.001, deadline - loop.time()))
            if pin is None:
                self.stats.missing += 1
            else:
                ids.append(pin.lease_id)
        self._held[transfer_id] = (ids, deadline)  # re-inserted: newest last
        if before == 0:  # give the hold back at its deadline even if no other hold comes
            loop.call_at(deadline, lambda: self._expire(loop.time()))
        if before == 0 and ids:
            self.stats.held += 1
        self.stats.chunks_held += len(ids) - before
        while len(self._held) > MAX_TRANSFERS:
            oldest = next(iter(self._held))
            self._release(oldest)
            self.stats.evicted += 1
        if push_to is not None and self._push is not None and keys:
            self.stats.pushes += 1
            self._push(ns, list(keys), push_to)
        return len(ids) - before

    def done(self, transfer_id: str) -> bool:
        """The consumer has the chunks (or gave up): release the hold. False if unknown
        (already released, expired, or never held here)."""
        if transfer_id not in self._held:
            return False
        self._release(transfer_id)
        self.stats.released += 1
        return True

    def release_all(self) -> None:
        for transfer_id in list(self._held):
            self._release(transfer_id)

    def _expire(self, now: float) -> None:
        for transfer_id, (_, deadline) in list(self._held.items()):
            if deadline <= now:
                # The store never reclaims a lease on its own (an overdue lease keeps its
                # slot, see tiers/cpu): give the hold back here.
                self._release(transfer_id)
                self.stats.expired += 1

    def _release(self, transfer_id: str) -> None:
        ids, _ = self._held.pop(transfer_id)
        try:
            self._store.release(ids, TRANSFER_OWNER)
        except MeshKVError as exc:  # a bug: the store never closes these leases itself
            logger.warning("releasing transfer %s: %s", transfer_id, exc)
