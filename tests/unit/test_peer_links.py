"""``PeerLinks``: a forgotten peer's control link ends its task (no orphan per restart)."""

from __future__ import annotations

import asyncio
import gc
import weakref

from meshkv.mesh.links import PeerLinks
from meshkv.transport import (
    Listener,
    MemoryNetwork,
    MemoryTransport,
    Message,
    MsgKind,
    PeerInfo,
    TransportConfig,
)
from tests.helpers.cycles import run_without_cycle_collector

SECRET = b"links-test-secret-0123456789abcd"


async def two_nodes(seen: list[Message]) -> tuple[PeerLinks, Listener]:
    """Node "a"'s links and node "b"'s listener on one memory network; b keeps what it
    receives in ``seen``."""
    net = MemoryNetwork()

    async def handler(peer: PeerInfo, msg: Message) -> Message | None:
        seen.append(msg)
        return None

    server = MemoryTransport(net, TransportConfig(secret=SECRET, node_id="b"), "b")
    listener = await server.listen("b", 7000, handler)
    client = MemoryTransport(net, TransportConfig(secret=SECRET, node_id="a"), "a")
    links = PeerLinks(
        client, handler, connect_timeout_s=1.0, send_timeout_s=1.0,
        queue_limit=16, connections_per_peer=1,
    )  # fmt: skip
    return links, listener


def test_forget_ends_the_idle_link_task_at_once() -> None:
    async def main() -> None:
        seen: list[Message] = []
        links, listener = await two_nodes(seen)
        for round_ in range(20):  # the race is per forget: try it many times
            links.send(listener.address, MsgKind.PING, {"round": round_})
            async with asyncio.timeout(2.0):
                while links.stats.sent <= round_:
                    await asyncio.sleep(0.001)
            (link,) = links._links.values()
            task = link.task
            assert task is not None and not task.done()  # idle, waiting for work
            links.forget(listener.address)  # wakes and cancels in the same tick
            async with asyncio.timeout(1.0):
                await asyncio.wait({task})
            assert task.done()
        assert [m.header["round"] for m in seen] == list(range(20))
        await links.close()
        await listener.close()

    asyncio.run(main())


def test_a_forgotten_link_is_freed_without_the_cycle_collector() -> None:
    """A dead peer's control link (and the connection its task held) is freed when its
    task ends, not at the next full cycle collection, which a long-lived agent runs
    seldom (the soak's steady agent saw one such link per peer restart)."""

    async def main() -> None:
        links, listener = await two_nodes([])
        links.send(listener.address, MsgKind.PING, {})
        async with asyncio.timeout(2.0):
            while links.stats.sent < 1:
                await asyncio.sleep(0.001)
        (link,) = links._links.values()
        task = link.task
        assert task is not None
        ref = weakref.ref(task)  # the link itself has slots and no weak references
        del link
        links.forget(listener.address)  # cancelled: its exception holds its frame
        async with asyncio.timeout(1.0):
            await asyncio.wait({task})
        assert task.cancelled()
        del task
        await asyncio.sleep(0)
        assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]
        await links.close()
        await listener.close()

    run_without_cycle_collector(main)
