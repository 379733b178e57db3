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

Renewal: a decode engine whose request waits in its queue longer than the hold (a traffic
surge on the decode side) renews it through its agent (``TRANSFER_RENEW`` over the mesh), as
NIXL's decode side renews its lease by heartbeat: each renewal moves the deadline to at least
``now + seconds``, never past ``MAX_HOLD_S`` after the first hold, so a consumer that keeps
renewing and never reads cannot keep the slots for ever. The pins themselves are leases of
that whole length (the store's longest): the deadline here is what ends them.
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
MAX_HOLD_S = 600.0
"""Longest a transfer is held, renewals included (at most 0.9× the store's longest lease)."""

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
    renewed: int = 0
    """Renewals of a held transfer's deadline by its consumer."""
    renew_unknown: int = 0
    """Renewals of transfers not held here (released, expired, or never held)."""


@dataclass(slots=True)
class _Hold:
    lease_ids: list[int]
    started: float
    """``loop.time()`` of the first hold (renewals end ``max_hold_s`` after it)."""
    deadline: float


class Transfers:
    """Holds for prefill/decode transfers on this (producer) node."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._push: Pusher | None = None
        self._held: dict[str, _Hold] = {}
        """transfer id → its hold; insertion order = age."""

        self.stats = TransferStats()

    def set_pusher(self, push: Pusher) -> None:
        """Push to decode nodes through ``push`` from now on (the mesh registers it)."""
        self._push = push

    @property
    def _lease_s(self) -> float:
        """The store's longest lease: the pins' (read once the store has started)."""
        return self._store.cpu.config.max_lease_s

    @property
    def max_hold_s(self) -> float:
        """Longest hold, renewals included: inside the pins' leases, so none goes overdue."""
        return min(MAX_HOLD_S, 0.9 * self._lease_s)

    @property
    def open(self) -> int:
        return len(self._held)

    @property
    def pinned(self) -> int:
        return sum(len(h.lease_ids) for h in self._held.values())

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
        now = loop.time()
        self._expire(now)
        held = self._held.pop(transfer_id, None)
        new = held is None
        if held is None:
            held = _Hold([], now, now + min(max(0.0, hold_s), self.max_hold_s))
        ids = held.lease_ids
        before = len(ids)
        for key in keys:
            # A lease as long as the hold can ever last: the deadline below ends it.
            pin = store.pin_now(ns, key, TRANSFER_OWNER, self._lease_s)
            if pin is None:
                self.stats.missing += 1
            else:
                ids.append(pin.lease_id)
        self._held[transfer_id] = held  # re-inserted: newest last
        if new:  # give the hold back at its deadline even if no other call comes
            loop.call_at(held.deadline, self._at_deadline, transfer_id, held)
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

    def renew(self, transfer_ids: Sequence[str], seconds: float) -> int:
        """The consumer still wants these transfers (its request waits in the decode
        engine's queue): hold each at least ``seconds`` more, within ``max_hold_s`` of its
        first hold. Returns how many were held here to renew."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._expire(now)
        renewed = 0
        for transfer_id in transfer_ids:
            held = self._held.get(transfer_id)
            if held is None:
                self.stats.renew_unknown += 1
                continue
            # (the hold's timer, when it fires, finds the later deadline and waits for it)
            held.deadline = min(held.started + self.max_hold_s, max(held.deadline, now + seconds))
            renewed += 1
        self.stats.renewed += renewed
        return renewed

    def deadline_of(self, transfer_id: str) -> float | None:
        """The hold's deadline (``loop.time()``), or None if it is not held here."""
        held = self._held.get(transfer_id)
        return None if held is None else held.deadline

    def release_all(self) -> None:
        for transfer_id in list(self._held):
            self._release(transfer_id)

    def _at_deadline(self, transfer_id: str, hold: _Hold) -> None:
        """The hold's timer: give it back if its deadline has passed, else wait for the
        deadline a renewal moved (one timer per hold, however often it is renewed)."""
        if self._held.get(transfer_id) is not hold:
            return  # released already
        loop = asyncio.get_running_loop()
        if hold.deadline > loop.time():
            loop.call_at(hold.deadline, self._at_deadline, transfer_id, hold)
            return
        self._release(transfer_id)
        self.stats.expired += 1

    def _expire(self, now: float) -> None:
        for transfer_id, held in list(self._held.items()):
            if held.deadline <= now:
                # The store never reclaims a lease on its own (an overdue lease keeps its
                # slot, see tiers/cpu): give the hold back here.
                self._release(transfer_id)
                self.stats.expired += 1

    def _release(self, transfer_id: str) -> None:
        held = self._held.pop(transfer_id)
        try:
            self._store.release(held.lease_ids, TRANSFER_OWNER)
        except MeshKVError as exc:  # a bug: the store never closes these leases itself
            logger.warning("releasing transfer %s: %s", transfer_id, exc)
