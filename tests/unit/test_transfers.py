"""``Transfers``: a producer's holds on prefill/decode transfers in a real store, renewed by
their consumer up to the cap, never leaving an overdue lease behind."""

from __future__ import annotations

import asyncio

from meshkv.store import Store
from meshkv.transfers import MAX_HOLD_S, Transfers
from tests.unit.test_store import NS, config, key, put, run_async


async def _held(max_lease_s: float = 600.0) -> tuple[Store, Transfers]:
    store = Store(config(None, max_lease_s=max_lease_s))
    await store.start()
    for i in range(3):
        put(store, i)
    transfers = Transfers(store)
    assert transfers.hold(NS, [key(0), key(1), key(2)], "t1", 0.3, None) == 3
    return store, transfers


@run_async
async def test_a_renewal_moves_the_deadline_and_the_hold_ends_there() -> None:
    store, transfers = await _held()
    try:
        loop = asyncio.get_running_loop()
        first = transfers.deadline_of("t1")
        assert first is not None and transfers.pinned == 3
        assert transfers.renew(["t1", "other"], 0.6) == 1
        renewed = transfers.deadline_of("t1")
        assert renewed is not None and renewed >= loop.time() + 0.59 > first
        assert transfers.stats.renewed == 1 and transfers.stats.renew_unknown == 1
        # A shorter renewal never shortens the hold.
        assert transfers.renew(["t1"], 0.01) == 1
        assert transfers.deadline_of("t1") == renewed
        await asyncio.sleep(0.4)  # past the first deadline: still held
        assert transfers.pinned == 3 and transfers.stats.expired == 0
        await asyncio.sleep(0.4)  # past the renewed one: the timer gave the pins back
        assert transfers.pinned == 0 and transfers.stats.expired == 1
        assert store.cpu.open_leases == 0
        assert transfers.renew(["t1"], 10.0) == 0  # too late: renews nothing
    finally:
        await store.close(asyncio.get_running_loop().time() + 5)


@run_async
async def test_renewals_stop_at_the_cap_inside_the_pins_leases() -> None:
    """A consumer that renews for ever cannot keep the slots for ever: the hold ends at
    ``max_hold_s`` after it began, which is inside the store's longest lease, so no pin
    of a transfer ever goes overdue."""
    store, transfers = await _held(max_lease_s=2.0)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert transfers.max_hold_s == min(MAX_HOLD_S, 1.8)
        assert transfers.renew(["t1"], 600.0) == 1
        deadline = transfers.deadline_of("t1")
        assert deadline is not None and deadline <= started + 1.8 + 0.01
        while transfers.pinned:
            transfers.renew(["t1"], 600.0)
            await asyncio.sleep(0.1)
            assert loop.time() < started + 2.5, "the cap did not end the hold"
        assert transfers.stats.expired == 1 and store.cpu.open_leases == 0
        await asyncio.sleep(started + 2.2 - loop.time())  # past the pins' leases
        store.cpu.sweep(loop.time())
        assert store.cpu.counters.leases_expired == 0  # none was still open to go overdue
    finally:
        await store.close(asyncio.get_running_loop().time() + 5)
