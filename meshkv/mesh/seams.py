"""The mesh's seams: what the parts around ``MeshNode`` may ask of it, and what it gets.

In the manner of memberlist's ``Delegate`` and ``Transport``: the helpers never import the
node; they are given an object that satisfies one of these protocols (the node itself, or
a fake in their unit tests), and the node satisfies them all.

* ``NodeView``: what the peer-facing helpers (``fetch.Fetcher``, ``pusher.Pusher``, the
  admin routes) may ask: who is alive where, which node is home for a key, a connection to
  a peer, a lookup at a home.
* ``PeerDelegate``: what the peer server (``peer_server.PeerServer``) delivers to the node
  after decoding and validating a frame: membership and directory messages, lookups at this
  home, a chunk asked for that is gone, a finished transfer.
* ``Residency``: what the peer server asks of the node's puller before it serves a chunk:
  make it resident from local sources (SSD, a pending commit).

Imports point one way: ``node.py`` → helpers → ``seams.py`` (and the cores, the store, the
transport); never back to ``node.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from meshkv.chunk import ChunkKey, NamespaceId
from meshkv.mesh import messages as mm
from meshkv.transport.base import Connection


class NodeView(Protocol):
    """What the mesh's helpers may ask of the node."""

    @property
    def node_id(self) -> str: ...

    def now(self) -> float:
        """The node's clock (``loop.time()``): every deadline is on it."""
        ...

    def is_alive(self, node: str) -> bool:
        """Alive or suspect, as of the last ring rebuild."""
        ...

    def address_of(self, node: str) -> str | None:
        """The peer address of ``node`` (None when unknown)."""
        ...

    def homes(self, keys: Sequence[ChunkKey]) -> list[str]:
        """The home node of each key (the ring's owner)."""
        ...

    def home_of(self, key: ChunkKey) -> str: ...

    def successors(self, key: ChunkKey, count: int) -> list[str]:
        """The first ``count`` other members of ``key``'s preference list on the ring."""
        ...

    async def connection(self, address: str, deadline: float) -> Connection:
        """An authenticated data connection to ``address`` (from the node's pool)."""
        ...

    async def lookup_at(
        self, home: str, keys: Sequence[ChunkKey], deadline: float
    ) -> tuple[tuple[str, ...], ...]:
        """Holders of ``keys`` as their home knows them (this node answers for itself)."""
        ...


class PeerDelegate(Protocol):
    """What the peer server delivers to the node."""

    @property
    def node_id(self) -> str: ...

    def now(self) -> float: ...

    def on_membership(self, sender: str, src: str, msg: mm.Message) -> None:
        """A membership message from authenticated ``sender`` whose peer address is ``src``."""
        ...

    def on_directory(self, src: str, msg: mm.Announce | mm.Handoff) -> None:
        """A directory announcement or hand-off (sender already checked)."""
        ...

    def holders_here(self, keys: Sequence[bytes]) -> tuple[tuple[str, ...], ...]:
        """This node's answer, as the home, to a peer's lookup."""
        ...

    def not_held(self, key: ChunkKey) -> None:
        """A peer asked for ``key`` and it is not here (correct the key's home)."""
        ...

    def own_stats(self) -> dict[str, Any]:
        """This node's chunk counts per tier and hit rate (``NODE_STATS``)."""
        ...

    def transfer_done(self, consumer: str, transfer_id: str) -> None:
        """The consumer of a prefill/decode transfer is done with its chunks."""
        ...

    def transfer_renew(self, consumer: str, transfer_ids: Sequence[str], seconds: float) -> None:
        """The consumer still wants these transfers: hold them ``seconds`` more."""
        ...

    def count_checksum_failure(self) -> None:
        """A pushed chunk failed verification."""
        ...


class Residency(Protocol):
    """Make chunks resident from this node's own sources (the puller)."""

    async def resident(
        self, ns: NamespaceId, keys: Sequence[ChunkKey], wait: float, *, peers: bool = True
    ) -> None: ...
