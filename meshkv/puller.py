"""``Puller``: the one path that makes chunks resident in this node's CPU tier.

Every way a chunk becomes readable here goes through it: the SSD and peer hits a lookup
finds, a read of a chunk that is on SSD, a prefill/decode transfer whose producer the
request names, a push from a peer that is still landing, a peer asking for a chunk this
node keeps on SSD. It owns the one map of work in flight (``_flights``, key → ``Flight``),
so a chunk is promoted or pulled once however many ask, and each flight runs under one
absolute deadline (``loop.time()``) that every step is given.

A flight tries, in order, until the chunk is in the arena:

1. already there → done;
2. reserved here by another writer (an engine's commit, a peer's push landing) → wait for
   that reservation to settle (the store tells us of commits and aborts);
3. on SSD, or an evicted chunk whose SSD write is still running → promote it;
4. holders known (the lookup found them at the key's home, or a transfer names its
   producer) → pull from them in turn, least loaded first, through the ``ChunkSource``
   (the mesh);
5. the shared remote tier (Redis/Valkey, ``meshkv.tiers.remote``) when one is configured:
   first when the lookup found the chunk only there, else after every holder failed;
6. none of that → a miss: the engine recomputes, which is always the last resort.

The mesh registers itself as the source (``add_source``), the remote tier with
``add_remote``; without either the puller still promotes from SSD. Lookups report what a
flight will bring (``ssd``/``peer``/``remote``) so the engine can load asynchronously;
reads wait for the flights of their keys. A lookup asks the keys' homes and the remote
tier at once, so the remote tier adds no round trip to it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshkv.chunk import ChunkKey, NamespaceId
from meshkv.errors import MeshKVError
from meshkv.latency import LatencyHistogram
from meshkv.protocol import prefix_length
from meshkv.store import Store, Tier

logger = logging.getLogger(__name__)

DEADLINE_GRACE_S = 0.05
"""A flight's steps end by its deadline themselves (each is given it); the flight is cut
this much later only as a backstop, so a step can report why it ended."""

LAST_HOLDER_RETRIES = 2
"""Further attempts at the last holder after a transport failure (deadline permitting)."""
RETRY_PAUSE_S = 0.05

MAX_FLIGHTS = 4096
"""Most chunks being made resident at once; a lookup beyond it reports the rest as misses."""


class ChunkSource(Protocol):
    """Where chunks that are not on this node come from (the mesh's fetcher)."""

    async def locate(
        self, ns: NamespaceId, keys: Sequence[ChunkKey], deadline: float
    ) -> dict[ChunkKey, tuple[str, ...]]:
        """Live holders (other nodes) of each key, from the keys' homes; a home that
        does not answer by ``deadline`` contributes nothing."""
        ...

    def order(self, holders: Sequence[str]) -> list[str]:
        """``holders`` in the order to try them (least loaded first)."""
        ...

    async def pull(
        self,
        ns: NamespaceId,
        key: ChunkKey,
        holder: str,
        deadline: float,
        *,
        last: bool,
        named: bool = False,
    ) -> str | None:
        """Pull ``key`` from ``holder`` into the store; None when it is resident now,
        else the cause of the failure (``timeout``, ``transport``, ``stale`` ...).
        ``named``: the request named this holder (a transfer's producer): try it even if
        the failure detector currently suspects it."""
        ...

    def transfer_done(self, producer: str, transfer_id: str) -> None:
        """Tell the producer of a prefill/decode transfer that this node is done with it
        (every chunk arrived or was given up), so it can release its hold."""
        ...

    def transfer_renew(self, producer: str, transfer_ids: Sequence[str], seconds: float) -> None:
        """Ask the producer to hold these transfers ``seconds`` more (their requests wait in
        this node's engine's queue)."""
        ...


class LocalHolds(Protocol):
    """This node's producer side (``meshkv.transfers.Transfers``)."""

    def done(self, transfer_id: str) -> bool: ...

    def renew(self, transfer_ids: Sequence[str], seconds: float) -> int: ...


class RemoteSource(Protocol):
    """The shared remote tier (``meshkv.tiers.remote.RemoteTier``)."""

    async def contains(
        self, ns: NamespaceId, keys: Sequence[ChunkKey], deadline: float
    ) -> list[bool]:
        """Which of ``keys`` it holds; all False when it cannot say by ``deadline``."""
        ...

    async def fetch(self, ns: NamespaceId, key: ChunkKey, deadline: float) -> str | None:
        """Bring ``key`` into the store; None when resident now, else why not."""
        ...


@dataclass(frozen=True, slots=True)
class TransferHint:
    """A prefill/decode transfer the request names: where its chunks come from."""

    transfer_id: str
    producer: str
    """Node id of the producer's agent."""
    deadline: float
    """``loop.time()`` by which the chunks must be here (then: recompute)."""


@dataclass(slots=True)
class PullerConfig:
    """Settings of the puller."""

    pull_timeout_s: float = 5.0
    """Deadline of a flight started by a lookup (over every holder tried)."""
    max_concurrent_pulls: int = 16
    """Peer pulls running at once (more wait for a turn, under their deadline)."""


@dataclass(slots=True)
class PullerStats:
    """Counters of the puller (metrics: ``meshkv_flights_*``)."""

    started: int = 0
    resident: int = 0
    """Flights that ended with the chunk in the arena."""
    failed: int = 0
    by_way: Counter[str] = field(default_factory=Counter)
    """How flights made chunks resident: ``cpu`` (already), ``settled`` (another writer's
    commit), ``ssd`` (promotion), ``peer`` (pull), ``remote`` (the remote tier)."""
    failures: Counter[str] = field(default_factory=Counter)
    """Flights that ended without their chunk, by cause: ``full`` (too many flights),
    ``deadline``, ``no_holder`` (the causes of single pull attempts are the fetcher's),
    ``remote`` (the remote tier did not have it or failed; its own counters say which)."""
    joined: int = 0
    """Requests that found the chunk already in flight (single-flight saves)."""
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    """Seconds from a flight's start until its chunk was resident."""
    transfers: int = 0
    """Prefill/decode transfers this node finished waiting for (all chunks here or given up)."""
    transfers_incomplete: int = 0
    """Of those, transfers with a chunk that never arrived (recomputed by the engine)."""
    transfer_bytes: int = 0
    """Bytes of transfers' chunks that came over the network after their lookup."""
    transfer_wait: LatencyHistogram = field(default_factory=LatencyHistogram)
    """Seconds from the lookup naming a transfer until its last chunk was here."""
    transfers_abandoned: int = 0
    """Transfers an engine here dropped before loading them (its producer told at once)."""
    reads_late_ssd: int = 0
    """Chunks a read with a deadline answered without because their promotion from SSD
    was still running (the engine computes them; the promotion goes on)."""
    read_promotions: int = 0
    """SSD promotions a read started itself: the chunk left memory between the request's
    lookup (which promotes or found it there) and its read — the CPU tier too small for
    the requests in flight, each such chunk read from disk twice."""


@dataclass(slots=True)
class _TransferWait:
    """The chunks of one transfer this node is still waiting for."""

    producer: str
    keys: set[ChunkKey]
    started: float
    """``time.perf_counter()`` at the lookup that named the transfer (not ``loop.time()``:
    uvloop's clock moves in whole milliseconds, the size of a whole transfer here)."""
    pulled_bytes: int = 0
    """Bytes of its chunks that had to come over the network after the lookup."""
    failed: int = 0


_DISTANCE = {Tier.CPU: 0, Tier.SSD: 1, Tier.PEER: 2, Tier.REMOTE: 3}


def combine_tiers(ranks: Sequence[Sequence[Tier | None]]) -> list[Tier | None]:
    """Per position, where the chunks of every tensor-parallel rank are: the farthest of
    their tiers (the load waits for the slowest), None where any rank's chunk is missing."""
    first = ranks[0]
    if all(other == first for other in ranks[1:]):  # the usual case: the ranks agree
        return list(first)
    out: list[Tier | None] = []
    for found in zip(*ranks, strict=True):
        if None in found:
            out.append(None)
        else:
            out.append(max(found, key=_DISTANCE.__getitem__))
    return out


@dataclass(slots=True, eq=False)
class Flight:
    """One chunk being made resident."""

    ns: NamespaceId
    key: ChunkKey
    tier: Tier
    """What the flight expects to bring it from (``ssd`` or ``peer``)."""
    deadline: float
    holders: tuple[str, ...] = ()
    transfer: TransferHint | None = None
    local_only: bool = False
    """Only this node's own sources (a peer asked: never pull on its behalf)."""
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a reservation of the key held by another writer ends."""
    task: asyncio.Task[bool] | None = None
    on_resident: list[Callable[[ChunkKey], None]] = field(default_factory=list)
    """Readers to tell the moment the chunk is resident, before anything else runs on the
    loop (a done callback runs a loop turn later: another request's save could evict the
    chunk in between, where only clean chunks can go)."""


class Puller:
    """Makes chunks resident here; see the module docstring."""

    def __init__(self, store: Store, config: PullerConfig | None = None) -> None:
        self._store = store
        self.config = config or PullerConfig()
        self._source: ChunkSource | None = None
        self._node_id: str | None = None
        self._local_holds: LocalHolds | None = None
        self._remote: RemoteSource | None = None
        self._flights: dict[ChunkKey, Flight] = {}
        self._transfers: dict[str, _TransferWait] = {}
        """Transfer id → the keys still in flight: when none is left, the producer hears
        ``transfer_done``."""
        self._pulls = asyncio.Semaphore(self.config.max_concurrent_pulls)
        self._closing = False
        self.stats = PullerStats()
        store.add_listener(self)

    def add_source(self, source: ChunkSource) -> None:
        """Pull through ``source`` from now on (the mesh registers itself at start)."""
        self._source = source

    def add_remote(self, remote: RemoteSource) -> None:
        """Read misses from the shared remote tier too."""
        self._remote = remote

    def set_local_holds(self, node_id: str, holds: LocalHolds) -> None:
        """This node's own producer side (``meshkv.transfers.Transfers``): a transfer whose
        producer is this node (prefill and decode engines beside one agent) is released and
        renewed here, with or without the mesh."""
        self._node_id, self._local_holds = node_id, holds

    def renew_transfers(self, producer: str, transfer_ids: Sequence[str], seconds: float) -> None:
        """An engine here still waits to load these transfers: ask their producer to hold
        them ``seconds`` more (no-op for a remote producer without the mesh)."""
        if producer == self._node_id and self._local_holds is not None:
            self._local_holds.renew(transfer_ids, seconds)
        elif self._source is not None:
            self._source.transfer_renew(producer, transfer_ids, seconds)

    def abandon_transfer(self, producer: str, transfer_id: str) -> None:
        """An engine here dropped a request before loading its transfer (aborted while
        queued): the producer can release its hold now. A transfer this node is still
        pulling ends as usual, when its pulls do."""
        if transfer_id not in self._transfers and self._can_tell(producer):
            self.stats.transfers_abandoned += 1
            self._tell_done(producer, transfer_id)

    def _can_tell(self, producer: str) -> bool:
        """Whether this node can reach ``producer``'s holds (its own, or through the mesh)."""
        local = producer == self._node_id and self._local_holds is not None
        return local or self._source is not None

    def _tell_done(self, producer: str, transfer_id: str) -> None:
        if producer == self._node_id and self._local_holds is not None:
            self._local_holds.done(transfer_id)
        elif self._source is not None:
            self._source.transfer_done(producer, transfer_id)

    @property
    def has_source(self) -> bool:
        """Whether a miss here may be found elsewhere (the mesh or the remote tier)."""
        return self._source is not None or self._remote is not None

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def tier_of(self, key: ChunkKey) -> Tier | None:
        """What the flight of ``key`` will bring it from; None when none runs."""
        flight = self._flights.get(key)
        return None if flight is None else flight.tier

    # --- StoreListener ------------------------------------------------------------------

    def committed(self, key: ChunkKey, from_engine: bool) -> None:
        flight = self._flights.get(key)
        if flight is not None:
            flight.settled.set()

    def aborted(self, key: ChunkKey) -> None:
        flight = self._flights.get(key)
        if flight is not None:
            flight.settled.set()

    def dropped(self, keys: list[ChunkKey]) -> None:
        """Nothing to do: a flight checks the store at every step."""

    # --- lookups ------------------------------------------------------------------------

    def fill_in_flight(self, keys: Sequence[ChunkKey], tiers: list[Tier | None]) -> None:
        """Fill the misses of ``tiers`` with what is on its way: a running flight's tier, or
        ``peer`` for a key another writer is storing right now (a push landing)."""
        flights, store = self._flights, self._store
        for i, tier in enumerate(tiers):
            if tier is None:
                key = keys[i]
                flight = flights.get(key)
                if flight is not None:
                    tiers[i] = flight.tier
                elif store.being_written(key):
                    tiers[i] = Tier.PEER

    def start_local(
        self, ns: NamespaceId, keys: Sequence[ChunkKey], tiers: Sequence[Tier | None]
    ) -> None:
        """Start the flights of a lookup's found prefix that need no mesh round trip:
        promotions from SSD, waits for a chunk another writer is storing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.pull_timeout_s
        for key, tier in zip(keys, tiers, strict=True):
            if tier is not None and tier is not Tier.CPU and key not in self._flights:
                self._start(ns, key, tier, deadline)

    async def locate(
        self,
        ns: NamespaceId,
        keys: Sequence[ChunkKey],
        tiers: list[Tier | None],
        deadline: float,
        transfer: TransferHint | None = None,
    ) -> list[Tier | None]:
        """Fill the misses of ``tiers`` (the store's answer for ``keys``) with what a flight
        can bring, start the flights of the found prefix, and return the tiers.

        A key whose flight already runs reports that flight's tier. With ``transfer``, every
        miss is expected from the named producer (no directory round trip: it may not even
        know the chunks yet). Otherwise the source asks the keys' homes, by ``deadline``
        (the lookup's, which is short); the flights themselves get ``pull_timeout_s``."""
        return await self.locate_ranks([(ns, keys, tiers)], deadline, transfer)

    async def locate_ranks(
        self,
        ranks: Sequence[tuple[NamespaceId, Sequence[ChunkKey], list[Tier | None]]],
        deadline: float,
        transfer: TransferHint | None = None,
    ) -> list[Tier | None]:
        """:meth:`locate` for the same prompt positions of several tensor-parallel ranks
        (each its own namespace and keys; the first is the asker's). A position is found
        only where every rank's chunk is (a rank without its chunk fails the whole load),
        as the farthest of their tiers; the flights of every rank's found prefix start.
        Each rank's ``tiers`` is filled in place; the combined tiers are returned."""
        for _, keys, tiers in ranks:
            self.fill_in_flight(keys, tiers)
        holders: dict[ChunkKey, tuple[str, ...]] = {}
        if transfer is not None:
            for _, keys, tiers in ranks:
                for i, tier in enumerate(tiers):
                    if tier is not Tier.CPU:
                        holders[keys[i]] = (transfer.producer,)
                        tiers[i] = tier or Tier.PEER
        else:
            missing = [(ns, keys, tiers, [i for i, t in enumerate(tiers) if t is None])
                       for ns, keys, tiers in ranks]  # fmt: skip
            missing = [m for m in missing if m[3]]
            if missing:
                holders = await self._find_missing(missing, deadline)
        combined = combine_tiers([tiers for _, _, tiers in ranks])
        prefix = prefix_length(combined)  # only the prefix is ever loaded
        loop = asyncio.get_running_loop()
        flight_deadline = (
            transfer.deadline if transfer is not None else loop.time() + self.config.pull_timeout_s
        )
        for ns, keys, tiers in ranks:
            for key, tier in zip(keys[:prefix], tiers[:prefix], strict=True):
                if tier is not None and tier is not Tier.CPU:
                    self._start(ns, key, tier, flight_deadline, holders.get(key, ()), transfer)
        if (
            transfer is not None
            and transfer.transfer_id not in self._transfers
            and self._can_tell(transfer.producer)
        ):
            # Nothing to wait for (every chunk already here: pushed ahead of the request,
            # or made by a prefill engine beside this one): the producer can let go now.
            self.stats.transfers += 1
            self.stats.transfer_wait.observe(0.0)
            self._tell_done(transfer.producer, transfer.transfer_id)
        return combined

    async def _find_missing(
        self,
        missing: list[tuple[NamespaceId, Sequence[ChunkKey], list[Tier | None], list[int]]],
        deadline: float,
    ) -> dict[ChunkKey, tuple[str, ...]]:
        """Ask the homes (one round for every rank's misses: the directory knows keys, not
        namespaces) and the remote tier (per namespace) where the misses are; mark them in
        each rank's tiers and return the peer holders."""
        wanted = [[keys[i] for i in idx] for _, keys, _, idx in missing]
        everything = [key for group in wanted for key in group]
        in_remote: list[list[bool]] = []
        if self._remote is None:
            holders = await self._ask_homes(missing[0][0], everything, deadline)
        else:
            remote = self._remote
            homes = asyncio.ensure_future(self._ask_homes(missing[0][0], everything, deadline))
            in_remote = list(
                await asyncio.gather(
                    *(remote.contains(m[0], group, deadline)
                      for m, group in zip(missing, wanted, strict=True))
                )
            )  # fmt: skip
            holders = await homes
        for r, (_, keys, tiers, idx) in enumerate(missing):
            for n, i in enumerate(idx):
                if keys[i] in holders:
                    tiers[i] = Tier.PEER
                elif in_remote and in_remote[r][n]:
                    tiers[i] = Tier.REMOTE
        return holders

    async def _ask_homes(
        self, ns: NamespaceId, keys: list[ChunkKey], deadline: float
    ) -> dict[ChunkKey, tuple[str, ...]]:
        if self._source is None:
            return {}
        try:
            async with asyncio.timeout_at(deadline):  # the lookup's budget, enforced
                return await self._source.locate(ns, keys, deadline)
        except (MeshKVError, TimeoutError, OSError) as exc:
            logger.info("locating %d keys failed: %r", len(keys), exc)
            return {}

    # --- reads --------------------------------------------------------------------------

    async def resident(
        self,
        ns: NamespaceId,
        keys: Sequence[ChunkKey],
        wait: float,
        *,
        peers: bool = True,
        ssd_wait: float | None = None,
        on_resident: Callable[[ChunkKey], None] | None = None,
    ) -> None:
        """Before a read of ``keys``: promote those on SSD and wait up to ``wait`` seconds
        for the flights already bringing the others. The promotions are waited for in full
        (a local disk read with its own deadline), or for at most ``ssd_wait`` seconds when
        the reader has a deadline of its own (an engine's load: a slow disk then leaves
        the late chunks to be computed, and the promotions go on for the next reader,
        instead of answering after the engine stopped listening). ``peers=False`` (a peer
        asking for a chunk) waits only for local sources: SSD and a writer's pending
        commit. ``on_resident(key)`` is called as each awaited chunk arrives, so the reader
        can pin it at once (chunks that arrive early would otherwise be evicted by later
        arrivals before the read pins them all); it may be called after this returns."""
        store = self._store
        loop = asyncio.get_running_loop()
        started = loop.time()
        local_deadline = started + self.config.pull_timeout_s
        must: list[asyncio.Task[bool]] = []
        may: list[asyncio.Task[bool]] = []
        for key, tier in zip(keys, store.peek(ns, keys), strict=True):
            if tier is Tier.CPU:
                continue  # in memory already (write-through: on SSD as well)
            flight = self._flights.get(key)
            if flight is None:
                if store.on_ssd(ns, key):
                    flight = self._start(ns, key, Tier.SSD, local_deadline)
                    self.stats.read_promotions += flight is not None
                elif wait > 0 and store.being_written(key):
                    flight = self._start(ns, key, Tier.PEER, loop.time() + wait, local_only=True)
            if flight is None or flight.task is None:
                continue
            if on_resident is not None:
                if flight.task.done():  # ended, its listeners told: one loop turn later
                    flight.task.add_done_callback(functools.partial(_arrived, on_resident, key))
                else:
                    flight.on_resident.append(on_resident)
            if flight.tier is Tier.SSD:
                must.append(flight.task)
            elif peers or flight.local_only:
                may.append(flight.task)
        if must:
            await asyncio.wait(must, timeout=ssd_wait)
            self.stats.reads_late_ssd += sum(1 for task in must if not task.done())
        if may and wait > 0:
            left = wait if ssd_wait is None else started + wait - loop.time()
            if left > 0:
                await asyncio.wait(may, timeout=left)

    # --- flights ------------------------------------------------------------------------

    def _start(
        self,
        ns: NamespaceId,
        key: ChunkKey,
        tier: Tier,
        deadline: float,
        holders: tuple[str, ...] = (),
        transfer: TransferHint | None = None,
        *,
        local_only: bool = False,
    ) -> Flight | None:
        flight = self._flights.get(key)
        if flight is not None:
            self.stats.joined += 1
            if holders and not flight.holders:
                flight.holders = holders  # a later lookup found holders: use them too
            return flight
        if self._closing:
            return None
        if len(self._flights) >= MAX_FLIGHTS:
            self.stats.failures["full"] += 1
            return None
        flight = Flight(ns, key, tier, deadline, holders, transfer, local_only)
        self._flights[key] = flight
        if transfer is not None:
            wait = self._transfers.get(transfer.transfer_id)
            if wait is None:
                wait = self._transfers[transfer.transfer_id] = _TransferWait(
                    transfer.producer, set(), time.perf_counter()
                )
            wait.keys.add(key)
        flight.task = asyncio.get_running_loop().create_task(
            self._fly(flight), name=f"meshkv-flight-{key.hex()[:8]}"
        )
        flight.task.add_done_callback(lambda _: self._landed(flight))
        self.stats.started += 1
        return flight

    def _landed(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        transfer = flight.transfer
        if transfer is None:
            return
        wait = self._transfers.get(transfer.transfer_id)
        if wait is None:
            return
        wait.keys.discard(flight.key)
        task = flight.task
        arrived = task is not None and not task.cancelled() and task.result()
        if arrived:
            entry = self._store.cpu.get(flight.key)
            wait.pulled_bytes += entry.size if entry is not None else 0
        else:
            wait.failed += 1
        self._maybe_done(transfer.transfer_id)

    def _maybe_done(self, transfer_id: str) -> None:
        wait = self._transfers.get(transfer_id)
        if wait is None or wait.keys:
            return
        del self._transfers[transfer_id]
        st = self.stats
        st.transfers += 1
        st.transfers_incomplete += 1 if wait.failed else 0
        st.transfer_bytes += wait.pulled_bytes
        st.transfer_wait.observe(time.perf_counter() - wait.started)
        self._tell_done(wait.producer, transfer_id)

    async def _fly(self, flight: Flight) -> bool:
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(flight.deadline + DEADLINE_GRACE_S):
                way = await self._steps(flight)
        except TimeoutError:
            way = None
            self.stats.failures["deadline"] += 1
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in one flight must not take the agent down: a miss
            logger.exception("flight of %s failed", flight.key.hex())
            way = None
        if way is None:
            self.stats.failed += 1
            return False
        for listener in flight.on_resident:  # no await since the commit: still resident
            try:
                listener(flight.key)
            except Exception:  # a reader's callback must not fail the flight
                logger.exception("a reader's on_resident for %s failed", flight.key.hex())
        self.stats.resident += 1
        self.stats.by_way[way] += 1
        self.stats.latency.observe(time.perf_counter() - started)
        return True

    async def _steps(self, flight: Flight) -> str | None:
        """Run the flight's steps; returns how the chunk became resident, None if not."""
        store, ns, key = self._store, flight.ns, flight.key
        if store.lookup(ns, [key])[0] == Tier.CPU:
            return "cpu"
        if store.being_written(key):
            flight.settled.clear()
            while store.being_written(key):
                await flight.settled.wait()
                flight.settled.clear()
            if store.lookup(ns, [key])[0] == Tier.CPU:
                return "settled"
        if store.on_ssd(ns, key) and await store.promote(ns, key, flight.deadline):
            return "ssd"
        if flight.local_only:
            return None
        remote = self._remote
        if flight.tier is Tier.REMOTE and remote is not None:
            if await remote.fetch(ns, key, flight.deadline) is None:
                return "remote"
            self.stats.failures["remote"] += 1
            return None
        way = await self._pull_from_holders(flight)
        if way is not None or remote is None:
            return way
        if store.lookup(ns, [key])[0] == Tier.CPU:
            return "settled"
        if await remote.fetch(ns, key, flight.deadline) is None:
            return "remote"
        self.stats.failures["remote"] += 1
        return None

    async def _pull_from_holders(self, flight: Flight) -> str | None:
        """Try the flight's holders (asking the homes if it has none): ``peer`` when pulled,
        ``settled`` when the chunk arrived meanwhile, None when not here."""
        store, ns, key = self._store, flight.ns, flight.key
        source = self._source
        if source is None:
            return None
        holders = flight.holders
        if not holders:
            found = await source.locate(ns, [key], flight.deadline)
            holders = found.get(key, ())
        if not holders:
            self.stats.failures["no_holder"] += 1
            return None
        async with self._pulls:
            ordered = source.order(holders)
            # The last holder gets a few more tries after a transport failure (a connection
            # reset while it was being set up) while the deadline allows.
            attempts = [*ordered, *[ordered[-1]] * LAST_HOLDER_RETRIES]
            loop = asyncio.get_running_loop()
            cause: str | None = None
            for i, holder in enumerate(attempts):
                if store.lookup(ns, [key])[0] == Tier.CPU:
                    return "settled"  # arrived meanwhile (a push, another engine)
                if i >= len(ordered):
                    if cause != "transport" or loop.time() + RETRY_PAUSE_S >= flight.deadline:
                        break
                    await asyncio.sleep(RETRY_PAUSE_S)
                named = flight.transfer is not None and holder == flight.transfer.producer
                cause = await source.pull(
                    ns, key, holder, flight.deadline, last=i >= len(ordered) - 1, named=named
                )
                if cause is None:
                    return "peer"
                logger.info("pull of %s from %s failed: %s", key.hex(), holder, cause)
        return None

    async def close(self) -> None:
        """Cancel every flight (at shutdown)."""
        self._closing = True
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)


def _arrived(
    on_resident: Callable[[ChunkKey], None], key: ChunkKey, task: asyncio.Task[bool]
) -> None:
    """A flight ended: tell the reader when its chunk is resident."""
    if not task.cancelled() and task.exception() is None and task.result():
        on_resident(key)
